"""Calls the KMS Tokenize RPC from Python, as a research pipeline would.

The gRPC stubs are generated from the repository's proto/ with grpcio-tools into a temporary
folder on every run, so they always match the server. The connection is mutual TLS with the
caller's certificate (a principal bound to the tokenizer role and granted `tokenize` on the
domain's master key).

    python tokenize_example.py --endpoint 127.0.0.1:50051 --ca pki/ca.pem \
        --cert pki/tokenizer-1.pem --key pki/tokenizer-1.key --domain study-1 \
        --field ssn --transform '{"kind":"fpe","alphabet":"digits","separators":"-","max_len":9}' \
        999-41-2363 999-52-8812

Prints one JSON object: {"key_version": N, "values": [...]} (a failed value is null, with
its error under "errors"). Values are read from the arguments or, with "-", from standard
input one per line. Nothing is logged.
"""

import argparse
import importlib
import json
import pathlib
import sys
import tempfile

import grpc
from grpc_tools import protoc

PROTO_ROOT = pathlib.Path(__file__).resolve().parents[2] / "proto" / "proto"


def load_stubs(out_dir):
    """Generates kms/v1/kms_pb2*.py from proto/ into out_dir and imports them."""
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO_ROOT / "kms" / "v1" / "kms.proto"),
        ]
    )
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}")
    for package in ("kms", "kms/v1"):
        (pathlib.Path(out_dir) / package / "__init__.py").touch()
    sys.path.insert(0, str(out_dir))
    pb = importlib.import_module("kms.v1.kms_pb2")
    rpc = importlib.import_module("kms.v1.kms_pb2_grpc")
    return pb, rpc


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True, help="host:port")
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--server-name", default="localhost")
    parser.add_argument("--domain", required=True)
    parser.add_argument("--field", required=True)
    parser.add_argument("--transform", required=True, help="the transform as JSON")
    parser.add_argument("--patient", help="patient pseudonym of every value (date shifts)")
    parser.add_argument("values", nargs="+")
    args = parser.parse_args()
    values = args.values
    if values == ["-"]:
        values = [line.rstrip("\r\n") for line in sys.stdin]

    with tempfile.TemporaryDirectory() as out_dir:
        pb, rpc = load_stubs(out_dir)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=pathlib.Path(args.ca).read_bytes(),
            private_key=pathlib.Path(args.key).read_bytes(),
            certificate_chain=pathlib.Path(args.cert).read_bytes(),
        )
        options = [("grpc.ssl_target_name_override", args.server_name)]
        with grpc.secure_channel(args.endpoint, credentials, options) as channel:
            stub = rpc.KeyManagementStub(channel)
            request = pb.TokenizeRequest(
                domain=args.domain,
                field=args.field,
                transform_json=args.transform,
                values=values,
                patient_pseudonyms=[args.patient] * len(values) if args.patient else [],
            )
            try:
                response = stub.Tokenize(request, timeout=30)
            except grpc.RpcError as e:
                print(json.dumps({"error": e.code().name, "message": e.details()}))
                return 1
    out = {"key_version": response.key_version, "values": [], "errors": {}}
    for i, result in enumerate(response.results):
        if result.status.code != 0:
            out["values"].append(None)
            out["errors"][str(i)] = result.status.message
        else:
            out["values"].append(None if result.dropped else result.value)
    print(json.dumps(out))
    return 0 if not out["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
