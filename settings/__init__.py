"""A run's settings, in one place that the CLI, the server and the Ray app read: the model flags and loading the model
they name, the generation flags and their defaults, the text pipeline's flags. Remote code never imports this package.
"""
