"""Serving: a Ray Serve application that classifies images over HTTP behind input sanitization.

- ``config``: ``ServeSpec``, the ``args`` of a Serve config's VisionRay application (``serve/*.yaml``).
- ``sanitize``: the ASGI middleware and the checked decoder (no Ray needed).
- ``model``: loading a verified registry model and batched inference (``Predictor``).
- ``api``: the FastAPI routes (``make_api``), usable in process with ``LocalBackend``.
- ``app``: the Serve deployments and ``build_app`` (``import_path: visionray.serve.app:build_app``).
- ``client``: an httpx client that retries on 503, and the load tester.
"""
