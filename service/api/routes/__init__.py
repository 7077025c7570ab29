"""Thin route modules, one per resource. Each exposes `router`; `service.api.app` mounts them."""
