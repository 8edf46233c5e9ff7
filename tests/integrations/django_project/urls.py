from django.urls import path

from . import views

urlpatterns = [
    path("hold", views.hold),
    path("ahold", views.ahold),
    path("release", views.release),
    path("arelease", views.arelease),
    path("report", views.report),
]
