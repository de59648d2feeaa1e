"""PostgreSQL's names of the column types the migrations declare in DuckDB's words."""

PG_TYPES = {
    "character varying": "VARCHAR",
    "text": "VARCHAR",
    "json": "JSON",
    "double precision": "DOUBLE",
    "timestamp without time zone": "TIMESTAMP",
    "integer": "INTEGER",
    "boolean": "BOOLEAN",
}
