"""Service core: settings, schemas, auth, job store, runner, errors. FastAPI appears only in the
dashboard's router (dashboard.py) and the routes' dependencies (resources.py); the API's routes
are in webhook_handler.py."""

__version__ = "0.1.0"
SERVICE_NAME = "dpo-microservice"
