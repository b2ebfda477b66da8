"""A token sent in the URL (``?token=``, as websocket clients must) never reaches the gateway's log.

The access log leaves the query string out; tornado's own line for a refused request (401, 403,
404) wrote the whole URI, token included, where whoever reads the log (an operator, a log
shipper) could take it and act as that user.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from tornado import httpclient, websocket

from .gateway_in_process import TOKEN, gateway_in_process

NOBODYS = "not-a-token-of-anyone-0123456789"


@pytest.mark.asyncio
async def test_tokens_in_urls_of_refused_requests_stay_out_of_the_log(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with gateway_in_process(tmp_path, min_warm=0) as gw:
        ws_url = gw.url.replace("http://", "ws://")
        # a websocket to a kernel that is not the caller's: 404, with a valid token in the URL
        with pytest.raises(httpclient.HTTPClientError) as refused:
            await websocket.websocket_connect(f"{ws_url}/api/kernels/someone-elses/channels?token={TOKEN}")
        assert refused.value.code == 404
        http = httpclient.AsyncHTTPClient()
        for path, token, status in (("/api/gpu/leases/nope", TOKEN, 404), ("/api/gpu/leases?all=1", TOKEN, 403),
                                    ("/api/gpu/types", NOBODYS, 401)):
            response = await http.fetch(f"{gw.url}{path}{'&' if '?' in path else '?'}token={token}",
                                        raise_error=False)
            assert response.code == status, (path, response.body)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "/api/kernels/someone-elses/channels" in logged  # the refusals are logged...
    assert TOKEN not in logged and NOBODYS not in logged  # ...without the tokens
