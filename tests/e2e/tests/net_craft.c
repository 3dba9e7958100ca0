// hcraft: sends hand-made IPv4 packets from inside a sandbox (network e2e tests).
//
//   hcraft SRC DST TCPPORT UDPPORT COUNT
//   hcraft SRC DST TCPPORT UDPPORT COUNT OTHER
//
// Sends COUNT of each: a TCP ACK+PSH segment with data to DST:TCPPORT (no SYN:
// no connection was ever opened), an ICMP echo reply and an ICMP port
// unreachable (quoting a made-up UDP datagram) to DST, and one UDP datagram to
// DST:UDPPORT (a flow-opening packet, the control). Built static by the test.
//
// With OTHER: sends COUNT ICMP port unreachables to OTHER quoting the datagram
// DST:UDPPORT -> SRC:42000 (the reply direction of the control's flow), then
// one to DST with the same quote (the control: a real error about that flow).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static uint16_t csum(const void *data, size_t len, uint32_t sum)
{
	const uint8_t *p = data;
	for (; len > 1; p += 2, len -= 2)
		sum += (uint32_t)p[0] << 8 | p[1];
	if (len)
		sum += (uint32_t)p[0] << 8;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return htons(~sum & 0xffff);
}

static size_t ip_header(uint8_t *b, uint32_t src, uint32_t dst, uint8_t proto, size_t l4len)
{
	size_t total = 20 + l4len;
	memset(b, 0, 20);
	b[0] = 0x45;
	b[2] = total >> 8;
	b[3] = total & 0xff;
	b[8] = 64;
	b[9] = proto;
	memcpy(b + 12, &src, 4);
	memcpy(b + 16, &dst, 4);
	uint16_t c = csum(b, 20, 0);
	memcpy(b + 10, &c, 2);
	return total;
}

// TCP/UDP checksum over the pseudo header and the segment.
static uint16_t l4_csum(uint32_t src, uint32_t dst, uint8_t proto, const uint8_t *seg, size_t len)
{
	uint8_t ph[12];
	memcpy(ph, &src, 4);
	memcpy(ph + 4, &dst, 4);
	ph[8] = 0;
	ph[9] = proto;
	ph[10] = len >> 8;
	ph[11] = len & 0xff;
	uint32_t sum = 0;
	for (int i = 0; i < 12; i += 2)
		sum += (uint32_t)ph[i] << 8 | ph[i + 1];
	return csum(seg, len, sum);
}

static void send_pkt(int fd, const uint8_t *b, size_t len, uint32_t dst)
{
	struct sockaddr_in to = { .sin_family = AF_INET };
	to.sin_addr.s_addr = dst;
	if (sendto(fd, b, len, 0, (struct sockaddr *)&to, sizeof(to)) != (ssize_t)len) {
		perror("sendto");
		exit(1);
	}
}

int main(int argc, char **argv)
{
	if (argc != 6 && argc != 7) {
		fprintf(stderr, "usage: hcraft SRC DST TCPPORT UDPPORT COUNT [OTHER]\n");
		return 2;
	}
	uint32_t src = inet_addr(argv[1]), dst = inet_addr(argv[2]);
	uint16_t tport = atoi(argv[3]), uport = atoi(argv[4]);
	int count = atoi(argv[5]);
	int fd = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);
	if (fd < 0) {
		perror("socket");
		return 1;
	}
	uint8_t b[256];
	const char data[] = "hearth-crafted";
	if (argc == 7) {
		uint32_t other = inet_addr(argv[6]);
		uint8_t *m = b + 20;
		for (int i = 0; i <= count; i++) {
			uint32_t to = i < count ? other : dst;
			memset(m, 0, 8 + 28);
			m[0] = 3;
			m[1] = 3;
			ip_header(m + 8, dst, src, IPPROTO_UDP, 8);
			uint8_t *q = m + 28;
			q[0] = uport >> 8;
			q[1] = uport & 0xff;
			q[2] = 42000 >> 8;
			q[3] = 42000 & 0xff;
			q[5] = 8;
			uint16_t c = csum(m, 8 + 28, 0);
			memcpy(m + 2, &c, 2);
			send_pkt(fd, b, ip_header(b, src, to, IPPROTO_ICMP, 8 + 28), to);
		}
		printf("sent %d\n", count);
		return 0;
	}
	for (int i = 0; i < count; i++) {
		// TCP ACK|PSH with data, never preceded by a SYN.
		uint8_t *t = b + 20;
		size_t tl = 20 + sizeof(data);
		memset(t, 0, tl);
		t[0] = 40000 >> 8;
		t[1] = 40000 & 0xff;
		t[2] = tport >> 8;
		t[3] = tport & 0xff;
		t[7] = 1 + i;	 // seq
		t[11] = 1;	 // ack
		t[12] = 5 << 4;	 // data offset
		t[13] = 0x18;	 // ACK|PSH
		t[14] = 0xff;	 // window
		memcpy(t + 20, data, sizeof(data));
		uint16_t c = l4_csum(src, dst, IPPROTO_TCP, t, tl);
		memcpy(t + 16, &c, 2);
		send_pkt(fd, b, ip_header(b, src, dst, IPPROTO_TCP, tl), dst);

		// ICMP echo reply nobody asked for.
		uint8_t *m = b + 20;
		memset(m, 0, 8 + sizeof(data));
		m[0] = 0;
		m[5] = 0x77;	 // id
		m[7] = i;	 // seq
		memcpy(m + 8, data, sizeof(data));
		c = csum(m, 8 + sizeof(data), 0);
		memcpy(m + 2, &c, 2);
		send_pkt(fd, b, ip_header(b, src, dst, IPPROTO_ICMP, 8 + sizeof(data)), dst);

		// ICMP port unreachable quoting a UDP datagram DST sent us (it did not).
		memset(m, 0, 8 + 28);
		m[0] = 3;
		m[1] = 3;
		ip_header(m + 8, dst, src, IPPROTO_UDP, 8);
		uint8_t *q = m + 28;
		q[0] = 5353 >> 8;
		q[1] = 5353 & 0xff;
		q[2] = 41000 >> 8;
		q[3] = 41000 & 0xff;
		q[5] = 8;
		c = csum(m, 8 + 28, 0);
		memcpy(m + 2, &c, 2);
		send_pkt(fd, b, ip_header(b, src, dst, IPPROTO_ICMP, 8 + 28), dst);
	}
	// The control: one flow-opening UDP datagram.
	uint8_t *u = b + 20;
	size_t ul = 8 + sizeof(data);
	memset(u, 0, ul);
	u[0] = 42000 >> 8;
	u[1] = 42000 & 0xff;
	u[2] = uport >> 8;
	u[3] = uport & 0xff;
	u[5] = ul;
	memcpy(u + 8, data, sizeof(data));
	uint16_t c = l4_csum(src, dst, IPPROTO_UDP, u, ul);
	memcpy(u + 6, &c, 2);
	send_pkt(fd, b, ip_header(b, src, dst, IPPROTO_UDP, ul), dst);
	printf("sent %d\n", count);
	return 0;
}
