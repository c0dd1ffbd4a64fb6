"""HTTP serving of exported CTranslate2 models (no PyTorch).

settings.py (ServeSettings, WDSERVE_* variables) -> models.py (load directories, names and aliases)
-> batching.py (per-model dynamic batcher) -> service.py (request checks and translation, as plain
functions) -> app.py (create_app: lifespan, dependencies wrapping service.py, thin routes, error
handlers) ; text.py (sentence splitting, text checks), schemas.py (request/response bodies),
metrics.py (Prometheus), protocol.py (uvicorn's HTTP protocol plus request deadlines, a header
limit and the disconnect hook the batcher uses), cli.py (wdserve serve: uvicorn with that protocol
and its connection limits).
"""
