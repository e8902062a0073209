"""Serving: a Ray Serve application that classifies images over HTTP behind input sanitization.

- ``config``: ``ServeSpec``, the ``args`` of a Serve config's VisionRay application (``serve/*.yaml``).
- ``sanitize``: the ASGI middleware (keys, rate limits, body rules) and the content-type check (no Ray needed).
- ``structure``: the pure-Python container walk that refuses malformed and oversized images before any decoder.
- ``decode``, ``sandbox``, ``pool``: decoding untrusted bytes, only in confined decoder processes.
- ``errors``: ``Rejection``, a refusal with its HTTP status and code.
- ``predictor``: loading a verified registry model and batched inference (``Predictor``).
- ``api``: the FastAPI routes (``make_api``), usable in process with ``LocalBackend``.
- ``app``: the Serve deployments and ``build_app`` (``import_path: visionray.serve.app:build_app``).
- ``client``: an httpx client that retries on 503, and the load tester.
"""
