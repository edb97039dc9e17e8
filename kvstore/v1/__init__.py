"""Generated protobuf/gRPC code for ``proto/kvstore/v1`` (do not edit by hand).

Regenerate from the repository root with::

    python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. \
        --pyi_out=. proto/kvstore/v1/master.proto

``tests/master/test_generated.py`` fails when the committed files are stale.
"""
