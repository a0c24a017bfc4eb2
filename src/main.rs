use clap::Parser;
use std::process::ExitCode;
use takumo_keys::{
    config::{Cli, Command, LogFormat},
    error::error_chain,
    startup::{self, Application},
    telemetry,
};

fn main() -> ExitCode {
    takumo_keys::hashing::return_hash_memory_to_the_os();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("takumo-keys: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run())
}

async fn run() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Bootstrap(args)) => {
            let _logs = telemetry::init(LogFormat::Text);
            startup::bootstrap(&args).await.map(|(key, secret)| {
                eprintln!(
                    "created key {} ({}) in organization {}: it is shown once, store it now",
                    key.id, key.prefix, key.organization_id
                );
                println!("{}", secret.expose());
            })
        }
        Some(Command::Health(args)) => startup::health_check(&args).await,
        Some(Command::Migrate(args)) => {
            let _logs = telemetry::init(LogFormat::Text);
            takumo_keys::store::connect(args.database_url.expose(), &Default::default())
                .await
                .map(|store| tracing::info!(backend = store.backend(), "schema is up to date"))
        }
        command => {
            let args = match command {
                Some(Command::Serve(args)) => *args,
                _ => cli.serve,
            };
            let telemetry = telemetry::init(args.log_format);
            let result = match Application::build(&args).await {
                Ok(app) => app.run_until(startup::shutdown_signal()).await,
                Err(e) => Err(e),
            };
            // Last: spans of the shutdown itself are exported too.
            telemetry.shutdown();
            result
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("takumo-keys: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
