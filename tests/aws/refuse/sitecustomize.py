"""Capacity errors injected into EC2 RunInstances, for the moto end-to-end tests.

moto always has capacity; AWS sometimes has none. Every Python process started with this
directory on its path (the Ray head, whose autoscaler calls RunInstances) registers a
botocore hook that answers RunInstances itself with EC2's ``InsufficientInstanceCapacity``
error when the JSON file named by ``JUPYTER_GPU_TEST_REFUSE`` lists the request's instance type
and market (``{"refuse": [["p5.48xlarge", "spot"], ["g5.xlarge", "any"]]}``); otherwise the
call goes on to moto. The file is read on every call, so a test changes it while Ray runs.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from typing import Any

_CONTROL = os.environ.get("JUPYTER_GPU_TEST_REFUSE")


class _Body:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> Any:
        yield self.body


def _refuse(request: Any, **_: Any) -> Any:
    import botocore.awsrequest

    try:
        with open(str(_CONTROL)) as f:
            refused = json.load(f).get("refuse", [])
    except (OSError, ValueError):
        return None
    body = request.body.decode() if isinstance(request.body, bytes) else str(request.body or "")
    form = urllib.parse.parse_qs(body)
    instance_type = form.get("InstanceType", [""])[0]
    market = form.get("InstanceMarketOptions.MarketType", ["on-demand"])[0]
    if not any(t == instance_type and m in ("any", market) for t, m in refused):
        return None
    error = (f"<Response><Errors><Error><Code>InsufficientInstanceCapacity</Code><Message>We currently do not "
             f"have sufficient {instance_type} capacity ({market}) in the Availability Zone you requested"
             "</Message></Error></Errors><RequestID>injected</RequestID></Response>").encode()
    return botocore.awsrequest.AWSResponse(request.url, 500, {}, _Body(error))


if _CONTROL:
    import botocore.session

    _init = botocore.session.Session.__init__

    def _init_with_hook(self: Any, *args: Any, **kwargs: Any) -> None:
        _init(self, *args, **kwargs)
        self.register("before-send.ec2.RunInstances", _refuse)

    botocore.session.Session.__init__ = _init_with_hook
