"""The jupyter-gpu kernel gateway: auth, REST and websocket API, message relay, metering."""
