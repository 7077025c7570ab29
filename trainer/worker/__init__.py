"""The worker agent and its warm slot processes.

`agent.Agent` leases trials from the service over HTTP (through `trainer.client`),
keeps leases alive, and hands each trial to a `slots.Slot`: a long-lived process that
has imported torch once and runs trials one after another. Nothing here imports the
service, FastAPI or SQLAlchemy.
"""
