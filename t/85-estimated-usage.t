#!/usr/bin/perl

# What a request used is charged even when its answer does not say: a
# client that hangs up before the answer, a provider that times out after
# it had the request, a stream cut short before its last usage, and an
# answer the gateway cannot read (gzipped) each cost their workspace and
# their org what the provider counted and billed, as an estimate, and are
# counted in the status.  Before, each of them was charged nothing (or 1
# output token for a cut stream), so a client could spend a workspace's
# limits and budget by hanging up.

use strict;
use warnings;

use lib 't/lib';

use IO::Socket::INET;
use IO::Uncompress::Gunzip qw(gunzip);
use JSON::PP;
use Test::More;
use Time::HiRes qw(sleep time);

use Ratepool::Test;

my $t = Ratepool::Test->new;

my $KEY = 'sk-ant-mock-e1-' . Ratepool::Test::random_hex(8);
my $TOKEN = 'gw-est-' . Ratepool::Test::random_hex(8);

my $mock = $t->start_mock(port => 1, config => {
    keys => { $KEY => { org => 'org-e', name => 'e1' } },
});

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    upstream claude {
        ratepool zone=llm;
        ratepool_org org-e rpm=1000 itpm=10000000 otpm=1000000;
        ratepool_key e1 org=org-e server=127.0.0.1:%%PORT_1%% key=$KEY;
    }

    ratepool_workspace team daily_tokens=100000000;
    ratepool_client team ${\ $t->token_hash($TOKEN)};

    server {
        listen 127.0.0.1:%%PORT_0%%;
        client_body_buffer_size 64k;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location /short/ {
            rewrite ^/short(/.*)\$ \$1 break;
            ratepool_pass http://claude;
            proxy_read_timeout 1s;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF

$t->run;

sub team {
    return Ratepool::Test::by_name($t->status->{workspaces})->{team};
}

sub key_status {
    my $pool = $t->status->{pools}[0];
    return Ratepool::Test::by_name($pool->{keys})->{e1};
}

sub settled {
    my $deadline = time + 8;
    while (time < $deadline) {
        return 1 if ($t->status->{totals}{in_flight} // 1) == 0;
        sleep 0.1;
    }
    return 0;
}

# a request written by hand, so that the client can leave when it likes
sub send_raw {
    my (%args) = @_;
    my $body = encode_json($args{body});
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . $t->port(0))
        or die "connect: $!\n";
    print $s "POST " . ($args{path} // '/v1/messages') . " HTTP/1.1\r\n"
        . "Host: gw\r\nx-api-key: $TOKEN\r\nanthropic-version: 2023-06-01\r\n"
        . join('', map { "$_->[0]: $_->[1]\r\n" } @{ $args{headers} || [] })
        . "Content-Type: application/json\r\n"
        . 'Content-Length: ' . length($body) . "\r\n\r\n$body";
    return $s;
}

my $prompt = 'a prompt of twenty kilobytes ' x 700;      # 20,300 bytes
my $big = { model => 'claude-sonnet-4-6', max_tokens => 100,
            messages => [ { role => 'user', content => $prompt } ] };

# --- clients that hang up while the provider works -------------------------

my $before = team();
my $seen = @{ $mock->log };

my @clients = map { send_raw(body => $big,
                             headers => [ ['x-mock-delay-ms', 3000] ]) }
              1 .. 6;
sleep 0.5;
close $_ for @clients;
ok(settled(), 'six clients that hang up before the answer leave nothing '
    . 'in flight');

my @had = @{ $mock->log }[ $seen .. $#{ $mock->log } ];
is(scalar @had, 6, 'the provider had all six requests');

my $billed = 0;
$billed += $_->{usage}{input_tokens} // 0 for @had;

my $after = team();
my $charged = $after->{tokens_today} - $before->{tokens_today};
ok($charged >= 0.8 * $billed && $charged <= 1.2 * $billed,
    "they are charged about the input the provider counted ($charged of "
    . "$billed tokens)");
ok($after->{tokens}{input} - $before->{tokens}{input} >= 0.8 * $billed,
    'as input tokens, toward the workspace\'s and org\'s limits too');
is($after->{tokens}{output}, $before->{tokens}{output},
    'and no output: none was produced for them');
is(key_status()->{usage_estimated}, 6, 'the key counts six estimates');

# --- a provider that times out after it had the request --------------------

$before = team();
my $r = $t->messages(token => $TOKEN, path => '/short/v1/messages',
                     body => $big, headers => [ 'x-mock-delay-ms' => 3000 ]);
is($r->{status}, 504, 'a provider that does not answer in time: 504');
settled();
$charged = team()->{tokens_today} - $before->{tokens_today};
ok($charged >= 4000, "and the request it had is charged ($charged tokens)");
is(key_status()->{usage_estimated}, 7, 'estimated');

# --- a stream the client leaves after half its text ------------------------

$before = team();
my $s = send_raw(
    body => { model => 'claude-sonnet-4-6', max_tokens => 4000,
              stream => JSON::PP::true,
              messages => [ { role => 'user', content => 'write' } ] },
    headers => [ ['x-mock-text-bytes', 8000],
                 ['x-mock-stream-delay-ms', 5],
                 ['x-mock-usage', '{"input_tokens":100,"output_tokens":2000}'] ]);

my ($raw, $text) = ('', '');
my $deadline = time + 10;
while (time < $deadline && length($text) < 4000) {
    sysread($s, $raw, 65536, length $raw) or last;
    my $events = Ratepool::Test::dechunk($raw =~ /\r\n\r\n(.*)\z/s ? $1 : '');
    $text = join '', $events =~ /"text":"([^"]*)"/g;
}
close $s;

ok(length($text) >= 4000, 'a client reads ' . length($text)
    . ' bytes of a streamed text of 8000');
ok(settled(), 'and leaves');

my $delta = team();
my $output = $delta->{tokens}{output} - $before->{tokens}{output};
ok($output >= length($text) / 4 && $output <= 2000,
    "it is charged the output its text carried ($output tokens, the "
    . 'provider billed up to 2000), not 1');
is($delta->{tokens}{input} - $before->{tokens}{input}, 100,
    'and the input the stream reported');
is(key_status()->{usage_estimated}, 8, 'estimated');

# a stream that ends as it should is charged what it says, no estimate
$before = team();
$r = $t->messages(token => $TOKEN, body => { stream => JSON::PP::true },
    headers => [ 'x-mock-text-bytes' => 8000, 'x-mock-stream-delay-ms' => 0,
                 'x-mock-usage' => '{"input_tokens":100,"output_tokens":2000}' ]);
is($r->{status}, 200, 'a whole stream');
settled();
is(team()->{tokens}{output} - $before->{tokens}{output}, 2000,
    'is charged the output it reported');
is(key_status()->{usage_estimated}, 8, 'with nothing estimated');

# --- an answer the gateway cannot read -------------------------------------

$before = team();
$r = $t->messages(token => $TOKEN,
    body => { max_tokens => 500 },
    headers => [ 'x-mock-gzip' => 1, 'Accept-Encoding' => 'gzip',
                 'x-mock-usage' => '{"input_tokens":40,"output_tokens":300}' ]);
is($r->{status}, 200, 'a gzipped answer');
is($r->{headers}{'content-encoding'}, 'gzip', 'reaches the client as it is');
my $plain;
gunzip(\$r->{body} => \$plain);
like($plain // '', qr/"output_tokens":300/, 'whole');
settled();
$after = team();
ok($after->{tokens}{input} > $before->{tokens}{input},
    'its input is charged as estimated ('
    . ($after->{tokens}{input} - $before->{tokens}{input}) . ' tokens)');
is($after->{tokens}{output} - $before->{tokens}{output}, 500,
    'and its output as reserved, all its max_tokens');
is(key_status()->{usage_estimated}, 9, 'estimated');

like($t->http(port => $t->port(0), path => '/ratepool/status?format=prometheus')->{body},
     qr/^ratepool_key_usage_estimated_total\{pool="claude",key="e1",org="org-e"\} 9$/m,
     'Prometheus counts the estimates');

like($t->error_log, qr/ratepool: an answer from key "e1" did not say all it used/,
     'an estimate is logged');

$t->stop;
$t->check_log;

done_testing;
