"""The speech server: HTTP (OpenAI's speech API, the web page, metrics) and Wyoming around the one speech engine.

`serve.py` (root) is its command line and `serve_ray.py` (root) its Ray Serve application; remote code never imports
this package.
"""
