"""A small analytics-event API on chresilient: the example backend of the demo and compose.

    POST /events          JSON object or list of {"id", "user", "name"}: stored, or spooled
                          while ClickHouse is down (202 either way; the body says which)
    GET  /events/count    rows in ClickHouse (503 with a reason while it is down)
    GET  /health/clickhouse[/...]   the chresilient health endpoints

Run it under any WSGI server, e.g. ``waitress-serve --listen 127.0.0.1:8080
flask_app:app`` from this directory; configure ClickHouse with ``CLICKHOUSE_*`` variables.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, jsonify, request

import chresilient
from chresilient.contrib.flask import init_app

TABLE = os.environ.get("EVENTS_TABLE", "events")
COLUMNS = ["id", "user", "name"]
DDL = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (id UInt64, user String, name String, "
    "received DateTime DEFAULT now()) ENGINE = MergeTree ORDER BY id"
)


def create_app() -> Flask:
    app = Flask(__name__)
    client = chresilient.get_clickhouse_client()
    mgr = init_app(app, client.manager,
                   reconnect_token=os.environ.get("CHRESILIENT_RECONNECT_TOKEN") or None)
    try:
        mgr.wait_until_ready(float(os.environ.get("EVENTS_STARTUP_WAIT", "10")))
        client.execute(DDL)
    except chresilient.ClickHouseUnavailableError as err:  # StartupTimeoutError included
        # The table is created by whoever starts first; events spool until then.
        app.logger.warning("could not create %s yet: %s", TABLE, err)

    @app.post("/events")
    def post_events() -> Any:
        body = request.get_json(silent=True)
        events = body if isinstance(body, list) else [body]
        try:
            rows = [(int(e["id"]), str(e["user"]), str(e["name"])) for e in events]
        except (TypeError, KeyError, ValueError):
            return jsonify(error='expected {"id": int, "user": str, "name": str} or a list'), 400
        result = mgr.insert(TABLE, rows, COLUMNS)
        return jsonify(rows=result.rows, delivered=result.delivered, spooled=result.spooled,
                       batch_id=result.batch_id), 202

    @app.get("/events/count")
    def count_events() -> Any:
        try:
            count = client.execute(f"SELECT count() FROM {TABLE}")[0][0]
        except chresilient.ClickHouseUnavailableError as err:
            return jsonify(error="ClickHouse is unavailable", detail=str(err)), 503
        return jsonify(count=count)

    return app


app = create_app()
