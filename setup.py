"""Packaging for chresilient."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="chresilient",
    version="0.1.0",
    description="A resilient ClickHouse connection layer for synchronous Python backends",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["chresilient", "chresilient.*"]),
    package_data={"chresilient": ["py.typed"], "chresilient.testing": ["*.xml"]},
    include_package_data=True,
    install_requires=[
        "clickhouse-driver>=0.2.6,<0.3",
        "SQLAlchemy>=2.0,<2.1",
        "structlog>=23.1,<27",
        "tenacity>=8.2,<10",
        "prometheus-client>=0.17,<1",
    ],
    extras_require={
        "flask": ["Flask>=2.2,<4"],
        "sqlalchemy": ["clickhouse-sqlalchemy>=0.3,<0.4"],
        "progress": ["tqdm>=4.60,<5"],
        "numpy": ["clickhouse-driver[numpy]>=0.2.6,<0.3"],
        "otel": ["opentelemetry-api>=1.20,<2"],
        "django": ["Django>=4.2,<6"],
        # the pytest plugin (chresilient.testing.pytest_plugin): fixtures for outage tests
        "testing": ["pytest>=7.4,<10"],
        "test": [
            "pytest>=7.4,<10",
            "pytest-docker>=2.0,<4",
            "pytest-timeout>=2.1,<3",
            "hypothesis>=6.80,<7",
            "PyYAML>=6,<7",
            "waitress>=2.1,<4",
            "gunicorn>=21,<24",
            # clickhouse-driver's own tests (tests/integration/test_driver_suite.py)
            "clickhouse-driver[lz4,zstd]>=0.2.6,<0.3",
            "parameterized>=0.9,<1",
            # spans read back in tests/unit/test_tracing.py and test_otel_spans.py
            "opentelemetry-sdk>=1.20,<2",
            "pytest-django>=4.5,<5",  # tests/django_project
        ],
        "bench": ["clickhouse-pool>=0.5.3,<0.6"],
        "dev": ["ruff>=0.5", "mypy>=1.8", "tox>=4,<5"],
    },
    entry_points={
        "console_scripts": ["chresilient=chresilient.cli:main"],
        "pytest11": ["chresilient = chresilient.testing.pytest_plugin"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Database",
        "Typing :: Typed",
    ],
)
