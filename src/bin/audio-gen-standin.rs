//! `audio-gen-standin`: a stand-in for the audio-generation service. Serves the files of a
//! folder at `GET /temp/{filename}` and deletes them on `DELETE /api/cleanup/temp/{filename}`.

use clap::Parser;

/// Stand-in audio-generation service for demos, docker compose and tests.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Folder whose files are served.
    #[arg(long, env = "STANDIN_DIR", default_value = "./audio")]
    dir: std::path::PathBuf,
    /// Address to listen on.
    #[arg(long, env = "STANDIN_LISTEN", default_value = "127.0.0.1:3000")]
    listen: String,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    audio_worker::telemetry::init();
    let cli = Cli::parse();
    let listener = tokio::net::TcpListener::bind(&cli.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, dir = %cli.dir.display(), "audio-gen-standin serving");
    let state = audio_worker::standin::Standin::new(cli.dir);
    audio_worker::standin::serve(listener, state, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}
