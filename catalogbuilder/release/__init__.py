"""Release stage: rows assembled per store partition (assemble.py), the build (build.py: partitioned, incremental,
atomic), the column schema (schema.py), the one writer (writer.py) and the summary (summary.py)."""
