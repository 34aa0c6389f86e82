"""The helper modules clickhouse-driver's tests import and its source distribution omits."""
