from django.urls import include, path

urlpatterns = [path("health/", include("chresilient.contrib.django.urls"))]
