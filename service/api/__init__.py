"""HTTP API: `create_app(settings)` in `app.py`; routes per resource in `routes/`."""
