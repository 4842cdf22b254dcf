"""VM state: snapshot and restore, migration, the GDB stub."""
