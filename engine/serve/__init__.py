"""The serving wing: the Open Inference Protocol (KServe v2) server over loaded models.

protocol.py parses and answers v2 bodies, runner.py holds one loaded model behind the server,
batching.py merges concurrent requests, server.py is the Starlette app and the `serve` verb."""
