"""The `tuneforge` command line: `main.app`, assembled from the sub-apps in this package."""
