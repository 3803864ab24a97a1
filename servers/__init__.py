"""Long-running servers: the hold proxy (an image that runs in the model's cluster while it is parked)
and the Hugging Face webhook receiver. Each runs as ``python -m servers.<name>``; neither imports a flow."""
