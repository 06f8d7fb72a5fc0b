#!/usr/bin/env python3
"""An OTLP/HTTP logs receiver for ornament's tests.

Each request is decoded with OpenTelemetry's own protobuf definitions (the
`opentelemetry-proto` package) and every log record is written to --out as one
JSON line, with its resource's attributes. With --refuse N the first N requests
are answered 503 Service Unavailable (a collector that is briefly down), so the
test sees the exporter's retries. Prints "listening PORT" once it listens.
"""

import argparse
import http.server
import json
import sys
import threading

from opentelemetry.proto.collector.logs.v1 import logs_service_pb2


def value(v):
    """An AnyValue as plain JSON."""
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


def attributes(kvs):
    """Key-value pairs as a dict; a key given twice is an error the test sees."""
    out = {}
    for kv in kvs:
        if kv.key in out:
            out.setdefault("__duplicate_keys__", []).append(kv.key)
        out[kv.key] = value(kv.value)
    return out


class State:
    def __init__(self, out, refuse):
        self.out = out
        self.refuse = refuse
        self.requests = 0
        self.lock = threading.Lock()


def handler(state):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            sys.stderr.write("otlp-receiver: " + (fmt % args) + "\n")

        def answer(self, code, body=b"", ctype="application/x-protobuf"):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            if self.path != "/v1/logs":
                self.answer(404, b"not the logs path", "text/plain")
                return
            if self.headers.get("Content-Type") != "application/x-protobuf":
                self.answer(415, b"protobuf only", "text/plain")
                return
            with state.lock:
                state.requests += 1
                if state.refuse > 0:
                    state.refuse -= 1
                    self.answer(503, b"refused by the test", "text/plain")
                    return
                req = logs_service_pb2.ExportLogsServiceRequest()
                req.ParseFromString(body)
                for rl in req.resource_logs:
                    resource = attributes(rl.resource.attributes)
                    for sl in rl.scope_logs:
                        for r in sl.log_records:
                            line = {
                                "request": state.requests,
                                "resource": resource,
                                "scope": sl.scope.name,
                                "time_unix_nano": r.time_unix_nano,
                                "observed_time_unix_nano": r.observed_time_unix_nano,
                                "severity_number": r.severity_number,
                                "severity_text": r.severity_text,
                                "event_name": r.event_name,
                                "body": value(r.body),
                                "attributes": attributes(r.attributes),
                            }
                            state.out.write(json.dumps(line) + "\n")
                state.out.flush()
            reply = logs_service_pb2.ExportLogsServiceResponse()
            self.answer(200, reply.SerializeToString())

    return Handler


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--refuse", type=int, default=0)
    a = p.parse_args()
    with open(a.out, "a", encoding="utf-8") as out:
        state = State(out, a.refuse)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler(state))
        print(f"listening {server.server_address[1]}", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
