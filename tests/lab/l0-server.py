#!/usr/bin/env python3
"""The nested lab's server on this machine (L0), which L2 reaches through -netdev user.

    l0-server.py DIRECTORY HTTP_PORT_FILE UPLOAD_PORT_FILE

HTTP on 127.0.0.1: `GET /NAME` serves DIRECTORY/NAME (the blob L2 downloads); `GET
/received/TAG` answers `bytes=N sha256=HEX` for the upload named TAG, waiting up to 30 s for it
to end.

Uploads on another port: a connection sends one line `TAG`, then its data until it closes.
L2 uploads with `nc HOST PORT -e sh -c 'echo TAG; cat FILE'`, whose cat sends the file with
sendfile(2): the NIC reads the file's pages by DMA, so an upload from a file in hot-plugged RAM
proves the NIC's DMA reaches that RAM.

The ports are chosen by the kernel and written to the two files once both listen.
"""
import hashlib
import http.server
import socket
import socketserver
import sys
import threading

uploads = {}
uploads_changed = threading.Condition()


class Upload(socketserver.StreamRequestHandler):
    def handle(self):
        tag = self.rfile.readline().strip().decode("ascii", "replace")
        digest = hashlib.sha256()
        size = 0
        while True:
            chunk = self.rfile.read(65536)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
        with uploads_changed:
            uploads[tag] = f"bytes={size} sha256={digest.hexdigest()}"
            uploads_changed.notify_all()


class Files(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        if not self.path.startswith("/received/"):
            return super().do_GET()
        tag = self.path[len("/received/"):]
        with uploads_changed:
            uploads_changed.wait_for(lambda: tag in uploads, timeout=30)
            answer = uploads.get(tag, "none")
        body = (answer + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Threaded(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    directory, http_port_file, upload_port_file = sys.argv[1:4]
    files = Threaded(("127.0.0.1", 0),
                     lambda *a: Files(*a, directory=directory))
    upload = Threaded(("127.0.0.1", 0), Upload)
    for server in (files, upload):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    with open(upload_port_file, "w") as f:
        f.write(f"{upload.server_address[1]}\n")
    with open(http_port_file, "w") as f:
        f.write(f"{files.server_address[1]}\n")
    threading.Event().wait()


if __name__ == "__main__":
    socket.setdefaulttimeout(120)
    main()
