"""``cuma serve``: an OpenAI-compatible HTTP server for profile-conditioned models, with a browser playground.

Layout (vLLM's split): :mod:`~cuma.serve.protocol` (request / response schemas and errors),
:mod:`~cuma.serve.app` (thin FastAPI routes), :mod:`~cuma.serve.serving` (from a request to engine work and back),
:mod:`~cuma.serve.engine` (the one worker that owns the model and batches mixed-profile requests),
:mod:`~cuma.serve.served` (loading the method, its tokenizer and profile encoder; prompts as in training),
:mod:`~cuma.serve.cli` (the command) and ``static/`` (the playground page). See docs/serving.md.
"""
