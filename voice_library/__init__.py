"""Voices a request can name: the pinned upstream presets, the uploaded voices folder, and which voice a name means.

The CLI (`infer_npu.py --voice`), the server and the Wyoming protocol read them; remote code never imports this package.
"""
