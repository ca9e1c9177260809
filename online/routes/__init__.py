"""The ranking service's routes, one APIRouter per concern; create_app (online/app.py) includes them all."""

from online.routes import admin, explain, health, rank

ROUTERS = (rank.router, explain.router, health.router, admin.router)

__all__ = ["ROUTERS"]
