"""The discrete-event simulator: the real broker core and scheduler policies on
virtual time (`lego bench simulate`)."""
