"""The analytics schema: applied at startup, recorded, kept after recovery (docs/schema.md)."""

from .apply import Schema
from .keeper import SchemaKeeper
from .source import SchemaFile, load_schema

__all__ = ["Schema", "SchemaFile", "SchemaKeeper", "load_schema"]
