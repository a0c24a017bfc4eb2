#!/usr/bin/env python3
"""Cross-language check: drives a running takumo-keys server with Python stubs
generated from proto/ by grpc_tools.protoc.

Usage: check.py --addr 127.0.0.1:PORT --token SERVICE_TOKEN --stubs DIR

Prints one line per check and, last, `python check: N passed, M failed`;
exits non-zero when any check failed.
"""

import argparse
import sys
import traceback


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--addr", required=True, help="host:port of the server")
    ap.add_argument("--token", required=True, help="a service token the server accepts")
    ap.add_argument("--stubs", required=True, help="directory holding the generated takumo/ package")
    ap.add_argument("--organization", default="py-org")
    args = ap.parse_args()

    sys.path.insert(0, args.stubs)
    import grpc
    from takumo.apikeys.v1 import api_keys_pb2 as pb
    from takumo.apikeys.v1 import api_keys_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(args.addr)
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
    except grpc.FutureTimeoutError:
        print(f"FAIL connect to {args.addr}: not ready within 10 s")
        print("python check: 0 passed, 1 failed")
        return 1
    stub = pb_grpc.ApiKeyServiceStub(channel)
    auth = (("authorization", f"Bearer {args.token}"), ("x-takumo-actor", "py"))
    org = args.organization

    passed = 0
    failed = 0
    state = {}

    def check(name, fn):
        nonlocal passed, failed
        try:
            fn()
        except Exception:  # noqa: BLE001 - every failure is reported, none stops the run
            failed += 1
            print(f"FAIL {name}")
            traceback.print_exc(limit=3, file=sys.stdout)
        else:
            passed += 1
            print(f"ok   {name}")

    def expect_status(code, call):
        try:
            call()
        except grpc.RpcError as e:
            assert e.code() == code, f"expected {code}, got {e.code()}: {e.details()}"
            return
        raise AssertionError(f"expected {code}, the call succeeded")

    def set_plan():
        org_resp = stub.SetOrganizationPlan(
            pb.SetOrganizationPlanRequest(organization_id=org, plan=pb.PLAN_DEVELOPER), metadata=auth, timeout=10
        )
        assert org_resp.id == org, org_resp
        assert org_resp.plan == pb.PLAN_DEVELOPER, org_resp
        assert org_resp.key_limit == 10, org_resp

    def create_key():
        resp = stub.CreateKey(
            pb.CreateKeyRequest(organization_id=org, name="python-client", preset=pb.SCOPE_PRESET_READ_ONLY),
            metadata=auth,
            timeout=10,
        )
        assert resp.secret.startswith("tk_live_"), "secret is not a live key"
        assert len(resp.secret) == 62, f"secret has {len(resp.secret)} characters"
        assert resp.key.organization_id == org, resp.key
        assert resp.key.created_by == "py", resp.key
        assert resp.key.status == pb.KEY_STATUS_ACTIVE, resp.key
        assert resp.key.environment == pb.ENVIRONMENT_LIVE, resp.key
        assert resp.secret.startswith(resp.key.prefix), "prefix is not the start of the key"
        assert "fleet.read" in resp.key.scopes and "fleet.manage" not in resp.key.scopes, resp.key.scopes
        assert all(s.endswith(".read") for s in resp.key.scopes), resp.key.scopes
        assert resp.key.HasField("created_at")
        state["secret"] = resp.secret
        state["id"] = resp.key.id

    def verify_valid():
        resp = stub.VerifyKey(
            pb.VerifyKeyRequest(key=state["secret"], required_scopes=["fleet.read"]), metadata=auth, timeout=10
        )
        assert resp.valid, resp
        assert resp.code == pb.VERIFY_CODE_VALID, pb.VerifyCode.Name(resp.code)
        assert resp.key_id == state["id"], resp
        assert resp.organization_id == org, resp
        assert resp.created_by == "py", resp
        assert not resp.missing_scopes, resp

    def verify_insufficient_scope():
        resp = stub.VerifyKey(
            pb.VerifyKeyRequest(key=state["secret"], required_scopes=["fleet.manage"]), metadata=auth, timeout=10
        )
        assert not resp.valid, resp
        assert resp.code == pb.VERIFY_CODE_INSUFFICIENT_SCOPE, pb.VerifyCode.Name(resp.code)
        assert list(resp.missing_scopes) == ["fleet.manage"], resp.missing_scopes

    def verify_malformed():
        # Same shape as a real key, last checksum character changed.
        bad = state["secret"][:-1] + ("A" if state["secret"][-1] != "A" else "B")
        for key in (bad, "tk_live_not-a-key", "hello"):
            resp = stub.VerifyKey(pb.VerifyKeyRequest(key=key), metadata=auth, timeout=10)
            assert not resp.valid, resp
            assert resp.code == pb.VERIFY_CODE_MALFORMED, (key[:12], pb.VerifyCode.Name(resp.code))
            assert resp.key_id == "", resp

    def create_without_credentials():
        expect_status(
            grpc.StatusCode.UNAUTHENTICATED,
            lambda: stub.CreateKey(
                pb.CreateKeyRequest(organization_id=org, name="nope", preset=pb.SCOPE_PRESET_READ_ONLY), timeout=10
            ),
        )

    def get_unknown_key():
        expect_status(
            grpc.StatusCode.NOT_FOUND,
            lambda: stub.GetKey(pb.GetKeyRequest(id="0000000000000000"), metadata=auth, timeout=10),
        )

    def get_created_key():
        key = stub.GetKey(pb.GetKeyRequest(id=state["id"]), metadata=auth, timeout=10)
        assert key.id == state["id"] and key.name == "python-client", key

    def update_key_with_a_field_mask():
        from google.protobuf import field_mask_pb2

        change = pb.ApiKey(id=state["id"], name="python-renamed")
        change.metadata["team"] = "platform"
        key = stub.UpdateKey(
            pb.UpdateKeyRequest(key=change, update_mask=field_mask_pb2.FieldMask(paths=["name", "metadata"])),
            metadata=auth,
            timeout=10,
        )
        assert key.name == "python-renamed" and dict(key.metadata) == {"team": "platform"}, key
        resp = stub.VerifyKey(pb.VerifyKeyRequest(key=state["secret"]), metadata=auth, timeout=10)
        assert resp.valid and dict(resp.metadata) == {"team": "platform"}, resp
        expect_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            lambda: stub.UpdateKey(
                pb.UpdateKeyRequest(key=change, update_mask=field_mask_pb2.FieldMask(paths=["scopes"])),
                metadata=auth,
                timeout=10,
            ),
        )

    check("SetOrganizationPlan sets the developer plan", set_plan)
    check("CreateKey with the read-only preset returns a live key shown once", create_key)
    check("VerifyKey with a held scope is VALID", verify_valid)
    check("VerifyKey with a scope the key lacks is INSUFFICIENT_SCOPE naming it", verify_insufficient_scope)
    check("VerifyKey with a malformed key is MALFORMED", verify_malformed)
    check("CreateKey without credentials is UNAUTHENTICATED", create_without_credentials)
    check("GetKey of an unknown id is NOT_FOUND", get_unknown_key)
    check("GetKey of the created key returns it", get_created_key)
    check("UpdateKey changes the masked fields and VerifyKey returns the metadata", update_key_with_a_field_mask)

    channel.close()
    print(f"python check: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
