"""The cluster: local Ray start-up, job planning, the upload, and the Jobs API client."""
