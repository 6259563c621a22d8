# StatusApp: python slim, a non-root user, the database on the /data volume.
FROM python:3.12-slim
WORKDIR /src
COPY pyproject.toml README.md LICENSE statusapp.py schema.sql config.example.toml ./
# --build-arg EXTRAS=[apprise] adds the Apprise channel type.
ARG EXTRAS=""
RUN pip install --no-cache-dir ".$EXTRAS" \
 && useradd --system --uid 10001 --no-create-home statusapp \
 && mkdir /data && chown statusapp /data
USER statusapp
WORKDIR /data
VOLUME /data
ENV STATUSAPP_SERVER_HOST=0.0.0.0 STATUSAPP_SERVER_DATABASE=/data/statusapp.db
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=15s --start-period=20s CMD ["statusapp", "healthcheck"]
CMD ["statusapp", "serve"]
