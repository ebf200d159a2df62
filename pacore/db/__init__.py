"""SQL persistence: schema, engine and session factory, migrations, and the per-user stores."""
