"""Engine-specific behaviour of the sandbox model servers (start-up argument checks, ...)."""
