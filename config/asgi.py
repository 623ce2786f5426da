import os

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

# The admin's CSS and JS are served by Django's own static handler: it only looks at paths under
# STATIC_URL and adds no middleware (and no thread hop) to the gateway's requests.
application = ASGIStaticFilesHandler(get_asgi_application())
