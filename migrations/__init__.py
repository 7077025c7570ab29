"""Alembic history of the `tf_*` tables. A package only so that a wheel ships it beside `service/`."""
