//! Wires the service together: data directory, database, qemu-img, job engine, HTTP
//! router with its middleware, recovery of interrupted jobs, and graceful shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;

use crate::api::problem::Problem;
use crate::api::{self, AppState};
use crate::config::{ServeConfig, TokenAction, TokenCommand};
use crate::error::{Error, ErrorCode, Result};
use crate::files::Files;
use crate::jobs::{Engine, EngineConfig};
use crate::qemu::Qemu;
use crate::store::Db;

/// Log to stderr, filtered by `STRATA_LOG` or else `default` (the service logs from
/// `info`, `strata token` only warnings, around the token it prints on stdout).
pub fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
        .unwrap_or_else(|_| default.into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Run the service until SIGINT or SIGTERM.
pub async fn serve(config: ServeConfig) -> Result<()> {
    let started = std::time::SystemTime::now();
    if let Some(path) = &config.clock_file {
        tracing::warn!(path = %path.display(), "using a test clock file instead of the system clock");
        crate::clock::use_file(path.clone());
    }
    let volumes_dir = config.data_dir.join("volumes");
    std::fs::create_dir_all(&volumes_dir).map_err(|e| {
        Error::Internal(format!(
            "cannot create data directory {}: {e}",
            volumes_dir.display()
        ))
    })?;
    let data_dir = std::fs::canonicalize(&config.data_dir)?;
    let volumes_dir = data_dir.join("volumes");
    // Before anything writes: a second service must not even migrate the database.
    let _data_dir_lock = lock_data_dir(&data_dir)?;
    let qemu_img_version = check_qemu_img(&config).await?;
    let live = crate::live::Live::new(config.runtime_dir.as_deref()).map_err(|e| {
        Error::Internal(format!(
            "cannot open --runtime-dir {}: {e}",
            config
                .runtime_dir
                .as_deref()
                .unwrap_or_else(|| "".as_ref())
                .display()
        ))
    })?;
    let db = Db::open(&data_dir.join("strata.db")).await?;
    let live = Arc::new(live);
    if config.verify_reads {
        tracing::info!(
            "--verify-reads: every view read from memory is checked against the database (slow; for tests)"
        );
    }
    // Before the first write: every transaction's events carry their resources' views.
    let renderer = Arc::new(api::events::ViewRenderer {
        volumes_dir: volumes_dir.clone(),
        live: Arc::clone(&live),
    });
    db.outbox().set_renderer(Arc::clone(&renderer) as _);
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let events =
        crate::events::Hub::load(db.clone(), config.event_history, shutdown_rx.clone()).await?;
    let auth_mode = auth_mode(&config, &db, &data_dir).await?;
    let token_key = crate::auth::open_key(&db, &data_dir).await?;
    // A qemu-img a killed predecessor left must be gone before recovery touches the
    // layer it was writing.
    let child_tag = data_dir.display().to_string();
    match crate::qemu::children::reap_orphans(&child_tag, Duration::from_secs(60)) {
        Ok(0) => {}
        Ok(count) => tracing::warn!(count, "killed qemu-img processes left by a previous run"),
        Err(e) => {
            return Err(Error::Internal(format!(
                "cannot make sure no qemu-img of a previous run still writes the volumes: {e}"
            )));
        }
    }
    let qemu = Qemu::new(
        config.qemu_img.clone(),
        Duration::from_secs(config.copy_timeout_secs),
    )
    .with_child_tag(child_tag)
    .with_direct_io(crate::files::takes_direct_io(&volumes_dir));
    let files = Files::new(
        volumes_dir.clone(),
        config.reserved_space,
        qemu.clone(),
        db.clone(),
    );
    let engine = Engine::new(
        db.clone(),
        qemu,
        files.clone(),
        EngineConfig {
            workers: config.workers,
            fault: config.fault.clone(),
            import_slots: config.import_slots.max(1),
            freeze_timeout: std::time::Duration::from_secs(config.freeze_timeout_secs.max(1)),
        },
    );
    let ready = Arc::new(AtomicBool::new(false));
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let state = AppState::new(api::Shared {
        db: db.clone(),
        files: files.clone(),
        engine: Arc::clone(&engine),
        max_disk_size: config.max_disk_size,
        ready: Arc::clone(&ready),
        run_history: config.run_history.max(1),
        body_limit: config.body_limit,
        request_timeout: Duration::from_secs(config.request_timeout_secs),
        live,
        events: Arc::clone(&events),
        qemu_img_version: qemu_img_version.into(),
        metrics: Arc::clone(&metrics),
        read_model: api::read_model::ReadModel::new(&db, renderer, config.verify_reads),
        auth: Arc::new(api::auth::Auth::new(auth_mode, token_key)),
        import: api::ImportSettings {
            dir: config.import_dir.clone(),
            max_bytes: config.import_max_bytes,
        },
    });
    let app = with_middleware(api::router(state), &config);

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::Internal(format!("cannot listen on {}: {e}", config.listen)))?;
    let address = listener.local_addr()?;
    // Printed on stdout so scripts and tests learn the port when --listen asks for 0.
    println!("strata listening on http://{address}");
    tracing::info!(%address, data_dir = %data_dir.display(), "strata started");

    let event_feed = events.spawn();
    let job_counter = metrics.follow_jobs(Arc::clone(&events));
    let scheduler_settings = crate::scheduler::Settings {
        tick: Duration::from_millis(config.scheduler_tick_ms.max(10)),
        sweep_interval: Duration::from_secs(config.sweep_interval_secs.max(1)),
        run_history: config.run_history.max(1),
    };
    let jobs = {
        let engine = Arc::clone(&engine);
        let db = db.clone();
        let shutdown_rx = shutdown_rx.clone();
        tokio::spawn(async move {
            match engine.recover().await {
                Ok(count) if count > 0 => tracing::info!(count, "interrupted jobs recovered"),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "recovering interrupted jobs failed"),
            }
            match crate::files::uploads::prune(&files, started).await {
                Ok(0) => {}
                Ok(count) => tracing::info!(count, "leftover uploads removed"),
                Err(e) => tracing::warn!(error = %e, "cleaning uploads failed"),
            }
            match crate::files::exports::prune(&files, true).await {
                Ok(0) => {}
                Ok(count) => tracing::info!(count, "stale export files removed"),
                Err(e) => tracing::warn!(error = %e, "cleaning export files failed"),
            }
            ready.store(true, Ordering::Release);
            let exports = spawn_export_cleanup(files.clone(), shutdown_rx.clone());
            let scheduler = crate::scheduler::spawn(
                db.clone(),
                Arc::clone(&engine),
                scheduler_settings,
                shutdown_rx.clone(),
            );
            let workers = engine.spawn_workers(shutdown_rx);
            let _ = scheduler.await;
            let _ = exports.await;
            for worker in workers {
                let _ = worker.await;
            }
        })
    };

    let mut http_shutdown = shutdown_rx.clone();
    // The client's address: failed token attempts are counted per address.
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = http_shutdown.wait_for(|stop| *stop).await;
    });
    let server = tokio::spawn(async move { server.await });
    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    if tokio::time::timeout(grace, jobs).await.is_err() {
        tracing::warn!("jobs still running after the grace period; they resume at the next start");
    }
    let _ = tokio::time::timeout(grace, server).await;
    let _ = event_feed.await;
    let _ = job_counter.await;
    db.close().await;
    Ok(())
}

/// `strata token ...`: manage the tokens of a data directory, whether its service runs
/// or not (SQLite serialises the writes; a revoked token is refused from the service's
/// next request). `create` prints the token alone on stdout, for scripts.
pub async fn token(command: TokenCommand) -> Result<()> {
    std::fs::create_dir_all(&command.data_dir).map_err(|e| {
        Error::Internal(format!(
            "cannot create data directory {}: {e}",
            command.data_dir.display()
        ))
    })?;
    let database = command.data_dir.join("strata.db");
    // Only `create` may start a database (before the service's first start); a
    // mistyped directory must not list or revoke in a new, empty one.
    if !matches!(command.action, TokenAction::Create { .. }) && !database.exists() {
        return Err(Error::Internal(format!(
            "no strata database at {}: is --data-dir the service's?",
            database.display()
        )));
    }
    let db = Db::open(&database).await?;
    let result = token_action(&db, &command.data_dir, command.action).await;
    db.close().await;
    result
}

async fn token_action(db: &Db, data_dir: &std::path::Path, action: TokenAction) -> Result<()> {
    let key = crate::auth::open_key(db, data_dir).await?;
    match action {
        TokenAction::Create {
            name,
            scope,
            expires,
        } => {
            let scope = crate::auth::parse_scope(&scope)?;
            let expires_at = match expires.as_deref() {
                Some(text) => Some(crate::store::now() + crate::auth::parse_lifetime(text)?),
                None => None,
            };
            let (token, text) = crate::auth::issue(db, &key, &name, scope, expires_at).await?;
            println!("{text}");
            eprintln!(
                "token {} (scope {}{}) created; it is shown only now",
                token.name,
                token.scope.as_str(),
                token.expires_at.map_or(String::new(), |at| format!(
                    ", expires {}",
                    crate::store::ts(at)
                ))
            );
            Ok(())
        }
        TokenAction::List => {
            let now = crate::store::now();
            println!(
                "{:<24} {:<8} {:<28} {:<28} STATUS",
                "NAME", "SCOPE", "CREATED", "EXPIRES"
            );
            for token in crate::store::tokens::list(&mut *db.reader().await?).await? {
                let status = token.status_at(now).as_str();
                println!(
                    "{:<24} {:<8} {:<28} {:<28} {status}",
                    token.name,
                    token.scope.as_str(),
                    crate::store::ts(token.created_at),
                    token.expires_at.map_or("never".into(), crate::store::ts),
                );
            }
            Ok(())
        }
        TokenAction::Revoke { name } => {
            let token = crate::auth::revoke(db, &name).await?;
            eprintln!("token {} revoked", token.name);
            Ok(())
        }
    }
}

/// Whether requests need tokens (see `api::auth::Mode`). On a non-loopback address
/// with no usable token the service does not start, unless told it may serve everyone
/// (`--insecure-no-auth`): anyone reaching the port could delete every disk.
async fn auth_mode(
    config: &ServeConfig,
    db: &Db,
    data_dir: &std::path::Path,
) -> Result<api::auth::Mode> {
    use api::auth::Mode;
    if config.insecure_no_auth {
        tracing::warn!(listen = %config.listen, "--insecure-no-auth: every request is served without authentication");
        return Ok(Mode::Off);
    }
    if config.listen.ip().is_loopback() {
        return Ok(Mode::WhenDefined);
    }
    let usable =
        crate::store::tokens::any_usable(&mut *db.reader().await?, crate::store::now()).await?;
    if !usable {
        return Err(Error::Internal(format!(
            "refusing to listen on {} with no API token: anyone who can reach the port could change or delete every disk. Create one first (strata token create --data-dir {} --name admin --scope admin), or pass --insecure-no-auth",
            config.listen,
            data_dir.display()
        )));
    }
    Ok(Mode::Required)
}

/// Hold an exclusive lock on `<data dir>/strata.lock` for the life of the process: two
/// services over one data directory would each "recover" the other's running jobs.
/// The kernel drops the lock when the process dies, however it dies; the descriptor is
/// close-on-exec, so no qemu-img child keeps it.
fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File> {
    let path = data_dir.join("strata.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::Internal(format!("cannot open {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Internal(format!(
            "another strata process serves {}; stop it first",
            data_dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::Internal(format!(
            "cannot lock {}: {e}",
            path.display()
        ))),
    }
}

/// Every ten minutes, remove export files of templates that were deleted or changed
/// (they are never served again; this only gives the space back).
fn spawn_export_cleanup(
    files: Files,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(600)) => {}
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
            if let Err(e) = crate::files::exports::prune(&files, false).await {
                tracing::warn!(error = %e, "cleaning export files failed");
            }
        }
    })
}

/// The first line of `qemu-img --version`, or why qemu-img cannot be run.
async fn check_qemu_img(config: &ServeConfig) -> Result<String> {
    let output = tokio::process::Command::new(&config.qemu_img)
        .arg("--version")
        .output()
        .await
        .map_err(|e| {
            Error::Internal(format!(
                "cannot run {} ({e}); install qemu-utils or pass --qemu-img",
                config.qemu_img.display()
            ))
        })?;
    if !output.status.success() {
        return Err(Error::Internal(format!(
            "{} --version failed: {}",
            config.qemu_img.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let version = String::from_utf8_lossy(&output.stdout);
    let version = version.lines().next().unwrap_or_default().trim().to_owned();
    tracing::info!(%version, "qemu-img found");
    Ok(version)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

fn with_middleware(router: axum::Router, config: &ServeConfig) -> axum::Router {
    let mut router = router
        // Outside the limit and timeout layers (see `api::router`), so their bare
        // answers become problems.
        .layer(axum::middleware::map_response(problem_for_bare_errors))
        // A 5xx is not always an error worth a log line (`/readyz` answers 503 while
        // recovery runs, a full disk answers 507): failures that are errors are logged
        // once, with their cause, where the problem answer is made (`api::problem`).
        .layer(TraceLayer::new_for_http().on_failure(()));
    if !config.cors_origins.is_empty() {
        let origin = if config.cors_origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(
                config
                    .cors_origins
                    .iter()
                    .filter_map(|o| HeaderValue::from_str(o).ok()),
            )
        };
        // `Authorization` must be named: a wildcard never covers it (Fetch standard).
        router = router.layer(
            CorsLayer::new()
                .allow_origin(origin)
                .allow_methods(tower_http::cors::Any)
                .allow_headers([
                    header::AUTHORIZATION,
                    header::CONTENT_TYPE,
                    header::HeaderName::from_static("last-event-id"),
                ])
                .expose_headers([
                    header::LOCATION,
                    header::WWW_AUTHENTICATE,
                    header::RETRY_AFTER,
                ]),
        );
    }
    router
}

/// Middleware (body limit, timeout) answers with bare status codes; give them the same
/// problem shape as every other error.
async fn problem_for_bare_errors(response: Response) -> Response {
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if is_problem || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        StatusCode::REQUEST_TIMEOUT => ErrorCode::RequestTimeout,
        StatusCode::NOT_FOUND => ErrorCode::RouteNotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
        s if s.is_client_error() => ErrorCode::ValidationFailed,
        _ => ErrorCode::Internal,
    };
    Problem::new(code, code.title().to_owned(), None).into_response()
}
