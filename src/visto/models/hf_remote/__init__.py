"""The code files of visto's remote-code transformers export (`visto.models.remote_code`):
`visto export` copies configuration_visto.py, modeling_visto.py and processing_visto.py beside
the weights, and `trust_remote_code=True` runs them. Each imports visto and wraps its own model
and processor, so transformers loads the directory wherever visto is installed."""
