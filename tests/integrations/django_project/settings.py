"""A minimal Django project for tests/test_django.py: shedder's middleware from settings."""

SECRET_KEY = "tests-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
ROOT_URLCONF = "tests.integrations.django_project.urls"
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, object] = {}
USE_TZ = True
MIDDLEWARE = ["shedder.django.LoadSheddingMiddleware"]
SHEDDER = {
    "max_concurrency": 1,
    "max_queue": 0,
    "exempt": ["/release", "/arelease"],
    "name": "django",
}
