"""Alembic migration scripts. Run them with ``stagewatch db upgrade``; see README.md in this folder."""
