"""Real model components for the diffusers backend: offline tiny builds and loading."""
