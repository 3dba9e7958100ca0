//! `hearth image pull` (and the implicit pull of `hearth run`): reads the NDJSON
//! [`PullEvent`] stream of `POST /v1/images/pull` and draws it — progress bars
//! (bytes and rate per layer, layers unpacked, the filesystem build) on a
//! terminal, one plain line per step otherwise.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Result;
use futures::StreamExt;
use hearth_api::{Image, PullEvent, PullImage};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::client::{CliError, Client};

fn short(digest: &str) -> &str {
    let hex = digest.trim_start_matches("sha256:");
    hex.get(..12).unwrap_or(hex)
}

/// Draws pull events.
struct View {
    bars: Option<MultiProgress>,
    layers: BTreeMap<usize, ProgressBar>,
    unpack: Option<ProgressBar>,
    build: Option<ProgressBar>,
}

impl View {
    fn new() -> View {
        let tty = std::io::stderr().is_terminal();
        View {
            bars: tty.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            layers: BTreeMap::new(),
            unpack: None,
            build: None,
        }
    }

    fn layer_bar(
        &mut self,
        layer: usize,
        layers: usize,
        digest: &str,
        size: u64,
    ) -> Option<&ProgressBar> {
        let bars = self.bars.as_ref()?;
        Some(self.layers.entry(layer).or_insert_with(|| {
            let style = ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            let pb = bars.add(ProgressBar::new(size).with_style(style));
            pb.set_prefix(format!("layer {layer}/{layers} {}", short(digest)));
            pb
        }))
    }

    fn show(&mut self, ev: &PullEvent) {
        let plain = self.bars.is_none();
        match ev {
            PullEvent::Resolved {
                digest,
                layers,
                bytes,
            } => {
                let line = format!(
                    "resolved {digest}: {layers} layers, {:.1} MB compressed",
                    *bytes as f64 / 1e6
                );
                match &self.bars {
                    Some(b) => {
                        let _ = b.println(line);
                    }
                    None => eprintln!("{line}"),
                }
            }
            PullEvent::Fetching {
                layer,
                layers,
                digest,
                done,
                size,
            } => {
                if let Some(pb) = self.layer_bar(*layer, *layers, digest, *size) {
                    pb.set_position(*done);
                }
            }
            PullEvent::Fetched {
                layer,
                layers,
                digest,
                size,
                cached,
            } => {
                let what = if *cached { "already cached" } else { "fetched" };
                if plain {
                    eprintln!(
                        "layer {layer}/{layers} {}: {what} ({size} bytes)",
                        short(digest)
                    );
                } else if let Some(pb) = self.layer_bar(*layer, *layers, digest, *size) {
                    if *cached {
                        // why: no bytes moved; a rate would be meaningless.
                        if let Ok(style) =
                            ProgressStyle::with_template("{prefix} [{bar:30}] {total_bytes} {msg}")
                        {
                            pb.set_style(style.progress_chars("=> "));
                        }
                    }
                    pb.set_position(*size);
                    pb.finish_with_message(what);
                }
            }
            PullEvent::Unpacked {
                layer,
                layers,
                bytes,
            } => {
                if plain {
                    eprintln!("layer {layer}/{layers}: unpacked ({bytes} bytes)");
                } else if let Some(bars) = &self.bars {
                    let pb = self.unpack.get_or_insert_with(|| {
                        let style = ProgressStyle::with_template(
                            "unpacking    [{bar:30}] {pos}/{len} layers {msg}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> ");
                        bars.add(ProgressBar::new(*layers as u64).with_style(style))
                    });
                    pb.set_position(*layer as u64);
                    pb.set_message(format!("({:.1} MB)", *bytes as f64 / 1e6));
                }
            }
            PullEvent::BuildingFs => {
                if let Some(u) = &self.unpack {
                    u.finish();
                }
                if plain {
                    eprintln!("building the root filesystem (ext4)");
                } else if let Some(bars) = &self.bars {
                    let pb = bars.add(ProgressBar::new_spinner());
                    pb.set_message("building the root filesystem (ext4)");
                    pb.enable_steady_tick(Duration::from_millis(120));
                    self.build = Some(pb);
                }
            }
            PullEvent::Reused => {
                let line = "root filesystem already built: reused";
                match &self.bars {
                    Some(b) => {
                        let _ = b.println(line);
                    }
                    None => eprintln!("{line}"),
                }
            }
            PullEvent::Done { .. } | PullEvent::Error { .. } => {
                if let Some(b) = self.build.take() {
                    b.finish_with_message("root filesystem built");
                }
            }
        }
    }
}

/// Pulls `reference` through the API, drawing progress on stderr.
pub async fn pull(c: &Client, reference: &str) -> Result<Image> {
    let resp = c
        .post_stream(
            "/v1/images/pull",
            &PullImage {
                reference: reference.to_string(),
            },
        )
        .await?;
    let mut view = View::new();
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk
            .map_err(|e| anyhow::anyhow!("connection to hearthd lost during the pull: {e}"))?;
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let ev: PullEvent = serde_json::from_slice(&line)
                .map_err(|e| anyhow::anyhow!("hearthd sent a malformed pull event: {e}"))?;
            view.show(&ev);
            match ev {
                PullEvent::Done { image } => return Ok(image),
                PullEvent::Error { error } => return Err(CliError::Api(error).into()),
                _ => {}
            }
        }
    }
    Err(anyhow::anyhow!(
        "the pull stream of {reference} ended before the image was ready (hearthd stopped?)"
    ))
}
