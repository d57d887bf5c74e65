"""A connector-based app: HTTP, WebSocket and raw TCP sessions from apm.

Run it with `apm load examples/web.conf`; see the README.
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "connectors"))
from apm_module import ApmModule  # noqa: E402


def on_connect(session):
    if session.protocol == "http":
        body = json.dumps({
            "hello": "from instance %d" % session.instance_id,
            "path": session.path,
            "query": session.query_object,
            "client": session.remote_ip,
        })
        session.write(body + "\n", {"x-status": "200", "content-type": "application/json"})
        session.close()
    else:  # ws and tcp: echo what arrives
        session.on_data = lambda data, is_binary: session.write(data)


ApmModule(on_connect).run()
