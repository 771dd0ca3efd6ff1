//! Bidirectional copy with half-close and byte counts.
use tokio::io::{AsyncRead, AsyncWrite};

/// Bytes moved by one proxied connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Transferred {
    /// From the connecting side to the accepting side.
    pub sent: u64,
    /// From the accepting side back.
    pub received: u64,
}

/// Copies both ways until both directions are closed; a FIN in one direction is passed on as
/// a shutdown of the other side's write half (half-close), as tokio's copy_bidirectional does.
pub async fn copy_both<A, B>(a: &mut A, b: &mut B) -> std::io::Result<Transferred>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (sent, received) =
        tokio::io::copy_bidirectional_with_sizes(a, b, 64 * 1024, 64 * 1024).await?;
    Ok(Transferred { sent, received })
}
