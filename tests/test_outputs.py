"""The output relay, fed scripted Jupyter messages (no kernel), as nbclient tests its own."""

from __future__ import annotations

from typing import Any

from jupyter_gpu.outputs import CellRelay, RemoteError, RemoteResult


class RecordingFrontend:
    def __init__(self, answers: list[str] | None = None) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.answers = list(answers or [])
        self.comm_metadata: list[dict[str, Any]] = []

    def stream(self, name: str, text: str) -> None:
        self.events.append(("stream", name, text))

    def display(self, data: dict[str, Any], metadata: dict[str, Any], transient: dict[str, Any], update: bool) -> None:
        self.events.append(("update" if update else "display", data, transient.get("display_id")))

    def clear_output(self, wait: bool) -> None:
        self.events.append(("clear", wait))

    def input(self, prompt: str, password: bool) -> str:
        self.events.append(("input", prompt, password))
        return self.answers.pop(0)

    def comm(self, msg_type: str, content: dict[str, Any], metadata: dict[str, Any], buffers: list[Any]) -> None:
        self.events.append((msg_type, content["comm_id"]))
        self.comm_metadata.append(metadata)


def msg(channel: str, msg_type: str, content: dict[str, Any], parent: str = "cell-1") -> dict[str, Any]:
    return {"channel": channel, "header": {"msg_type": msg_type, "msg_id": f"m-{msg_type}"},
            "parent_header": {"msg_id": parent}, "content": content, "buffers": []}


def run(messages: list[dict[str, Any]], frontend: RecordingFrontend | None = None) -> CellRelay:
    relay = CellRelay(frontend or RecordingFrontend(), "cell-1")
    for message in messages:
        relay.process_message(message)
    return relay


def test_streams_and_displays_replay_in_order_keeping_display_ids() -> None:
    frontend = RecordingFrontend()
    relay = run([
        msg("iopub", "status", {"execution_state": "busy"}),
        msg("iopub", "stream", {"name": "stdout", "text": "epoch 1\n"}),
        msg("iopub", "display_data", {"data": {"image/png": "iVBOR"}, "metadata": {}, "transient": {}}),
        msg("iopub", "display_data", {"data": {"text/plain": "0%"}, "metadata": {},
                                      "transient": {"display_id": "bar"}}),
        msg("iopub", "update_display_data", {"data": {"text/plain": "100%"}, "metadata": {},
                                             "transient": {"display_id": "bar"}}),
        msg("iopub", "clear_output", {"wait": True}),
        msg("iopub", "stream", {"name": "stderr", "text": "warn\n"}),
        msg("shell", "execute_reply", {"status": "ok"}),
        msg("iopub", "status", {"execution_state": "idle"}),
    ], frontend)
    assert relay.done and relay.error is None
    assert frontend.events == [
        ("stream", "stdout", "epoch 1\n"),
        ("display", {"image/png": "iVBOR"}, None),
        ("display", {"text/plain": "0%"}, "bar"),
        ("update", {"text/plain": "100%"}, "bar"),
        ("clear", True),
        ("stream", "stderr", "warn\n"),
    ]


def test_not_done_until_both_reply_and_idle_arrived() -> None:
    relay = run([msg("shell", "execute_reply", {"status": "ok"})])
    assert not relay.done
    relay.process_message(msg("iopub", "status", {"execution_state": "idle"}))
    assert relay.done


def test_messages_of_other_requests_are_ignored() -> None:
    frontend = RecordingFrontend()
    run([msg("iopub", "stream", {"name": "stdout", "text": "not mine"}, parent="other")], frontend)
    assert frontend.events == []


def test_execute_result_becomes_the_cells_result_with_its_mime_types() -> None:
    relay = run([msg("iopub", "execute_result", {"data": {"text/plain": "42", "text/html": "<b>42</b>"},
                                                 "metadata": {}, "execution_count": 3})])
    assert isinstance(relay.result, RemoteResult)
    data, _ = relay.result._repr_mimebundle_()
    assert data["text/html"] == "<b>42</b>" and repr(relay.result) == "42"


def test_remote_exception_keeps_type_name_and_remote_traceback() -> None:
    relay = run([
        msg("iopub", "error", {"ename": "ZeroDivisionError", "evalue": "division by zero",
                               "traceback": ["Traceback...", "ZeroDivisionError: division by zero"]}),
        msg("shell", "execute_reply", {"status": "error", "ename": "ZeroDivisionError",
                                       "evalue": "division by zero", "traceback": []}),
    ])
    assert isinstance(relay.error, RemoteError)
    assert type(relay.error).__name__ == "ZeroDivisionError"
    assert relay.error._render_traceback_()[-1] == "ZeroDivisionError: division by zero"


def test_a_remote_error_says_which_lease_type_and_node_it_came_from() -> None:
    relay = run([msg("shell", "execute_reply", {"status": "error", "ename": "ValueError", "evalue": "bad",
                                                "traceback": ["ValueError: bad"]})])
    assert isinstance(relay.error, RemoteError)
    assert relay.error._render_traceback_() == ["ValueError: bad"]  # nothing known, nothing claimed
    relay.error.engine_info = {"lease_id": "1a2b3c4d5e6f", "gpu_type": "a100", "node": "gpu-7"}
    assert relay.error._render_traceback_() == ["[the a100 kernel of lease 1a2b3c4d on node gpu-7]", "ValueError: bad"]
    relay.error.lost = ["model", "weights"]  # its kernel died under the cell: what went with it
    assert relay.error._render_traceback_()[-1] == "These lived only on that kernel and are gone: model, weights"


def test_input_request_is_answered_from_the_local_frontend() -> None:
    frontend = RecordingFrontend(answers=["ada"])
    relay = run([msg("stdin", "input_request", {"prompt": "name? ", "password": False})], frontend)
    assert relay.input_replies == ["ada"]
    assert frontend.events == [("input", "name? ", False)]


def test_pulled_values_are_put_back_together_from_their_pieces() -> None:
    frontend = RecordingFrontend()
    relay = CellRelay(frontend, "cell-1", helper_comm_id="helper")
    first = msg("iopub", "comm_msg", {"comm_id": "helper", "data": {
        "op": "pulled", "values": [{"name": "y", "blob": 0, "nbuf": 1}], "seq": 0, "last": False,
        "sizes": [6, 8], "pieces": [[0, 0, 6], [1, 0, 4]]}})
    first["buffers"] = [b"pickle", b"raw-"]
    second = msg("iopub", "comm_msg", {"comm_id": "helper", "data": {
        "op": "pulled", "seq": 1, "last": True, "pieces": [[1, 4, 4]]}})
    second["buffers"] = [b"data"]
    relay.process_message(first)
    relay.process_message(second)
    assert relay.pulled == [{"name": "y", "blob": 0, "nbuf": 1}]
    assert relay.pulled_blobs.complete
    assert [bytes(b) for b in relay.pulled_blobs.blobs] == [b"pickle", b"raw-data"]
    assert frontend.events == []  # the helper's messages are not output


def test_widget_comms_are_forwarded_to_the_local_frontend() -> None:
    frontend = RecordingFrontend()
    relay = CellRelay(frontend, "cell-1", helper_comm_id="helper")
    for msg_type in ("comm_open", "comm_msg", "comm_close"):
        message = msg("iopub", msg_type, {"comm_id": "widget-1", "data": {}})
        message["metadata"] = {"version": "2.1.0"}  # ipywidgets' protocol version, checked by JupyterLab
        relay.process_message(message)
    assert frontend.events == [("comm_open", "widget-1"), ("comm_msg", "widget-1"), ("comm_close", "widget-1")]
    assert frontend.comm_metadata == [{"version": "2.1.0"}] * 3
