"""Service core: settings, schemas, auth, job store, runner, errors (no FastAPI here)."""

__version__ = "0.1.0"
SERVICE_NAME = "dpo-microservice"
