"""Alembic environment: runs on the connection `storage.migrate` opened and locked.

Never run with a URL of its own: `gradwatch serve` (through
`storage.migrate.upgrade_database`) takes the migration lock first.
"""
from alembic import context

from gradwatch.server.storage.tables import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()
