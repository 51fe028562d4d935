{{/*
Every port, from .Values.ports: the configs' *_listen keys, containerPorts, probes, Services,
hosts.toml and NOTES all read them here. mirrorPort is where containerd on the node reaches the
proxy: the proxy port on the host network, else its hostPort.
*/}}
{{- define "damselfly.ports" -}}
{{- $s := .Values.ports.scheduler }}
{{- $d := .Values.ports.dfdaemon }}
schedulerGrpc: {{ $s.grpc }}
schedulerMetrics: {{ $s.metrics }}
dfdaemonGrpc: {{ $d.grpc }}
dfdaemonProxy: {{ $d.proxy }}
dfdaemonMetrics: {{ $d.metrics }}
dfdaemonHealth: {{ $d.health }}
dfdaemonUpload: {{ $d.upload }}
proxyHostPort: {{ .Values.dfdaemon.proxyHostPort | default $d.proxy }}
mirrorPort: {{ ternary $d.proxy (.Values.dfdaemon.proxyHostPort | default $d.proxy) .Values.dfdaemon.hostNetwork }}
{{- end }}

{{- define "damselfly.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix of every resource name: the release name unless fullnameOverride is set. Kept short
(45 characters) so "<prefix>-seed-peer-headless" fits in a 63-character DNS label.
*/}}
{{- define "damselfly.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- end }}

{{- define "damselfly.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "damselfly.image" -}}
{{- $ref := printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- with .Values.image.digest }}{{ $ref = printf "%s@%s" $ref . }}{{ end }}
{{- $ref }}
{{- end }}

{{/* Image of the hosts.toml init container and the restore hook: its own, or the Damselfly image. */}}
{{- define "damselfly.containerd.image" -}}
{{- $image := .Values.containerd.injectMirror.image | default dict }}
{{- if $image.repository }}
{{- if not $image.tag }}
{{- fail "containerd.injectMirror.image.repository is set without containerd.injectMirror.image.tag: name the tag (an image that has sh)" }}
{{- end }}
{{- printf "%s:%s" $image.repository (toString $image.tag) }}
{{- else }}
{{- include "damselfly.image" . }}
{{- end }}
{{- end }}

{{/* Common labels of objects; call with (dict "ctx" $ "component" "scheduler"). */}}
{{- define "damselfly.labels" -}}
helm.sh/chart: {{ include "damselfly.chart" .ctx }}
{{ include "damselfly.podLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
{{- end }}

{{/*
Labels of pod templates: no chart version and no app version, so that a chart bump that changes
nothing in a pod does not restart every dfdaemon of the fleet.
*/}}
{{- define "damselfly.podLabels" -}}
{{ include "damselfly.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: damselfly
{{- end }}

{{/*
Kubernetes quantity (50Gi, 500G, 1073741824) to bytes; fails on anything else.
*/}}
{{- define "damselfly.bytes" -}}
{{- $text := kindIs "float64" . | ternary (int64 . | toString) (toString .) }}
{{- $units := dict "" 1 "k" 1000 "K" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 }}
{{- $number := regexFind "^[0-9]+" $text }}
{{- $suffix := trimPrefix $number $text }}
{{- if or (not $number) (not (hasKey $units $suffix)) }}
{{- fail (printf "%q is not a size: use a Kubernetes quantity such as 20Gi or 500G" $text) }}
{{- end }}
{{- mul (int64 $number) (get $units $suffix) }}
{{- end }}

{{/*
The pod-level settings every component shares: no service-account token (nothing here talks to
the Kubernetes API), hostAliases, pull secrets. Call with (dict "ctx" $ "values" .Values.X).
*/}}
{{- define "damselfly.podCommon" -}}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.hostAliases }}
hostAliases:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
terminationGracePeriodSeconds: {{ .values.terminationGracePeriodSeconds }}
{{- end }}

{{/*
Where pods go: nodeSelector, tolerations, affinity. With `spread` and no affinity of the
user's, replicas prefer distinct nodes. Call with (dict "ctx" $ "values" .Values.X "component" C "spread" bool).
*/}}
{{- define "damselfly.placement" -}}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .values.affinity }}
affinity:
  {{- toYaml .values.affinity | nindent 2 }}
{{- else if .spread }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "damselfly.selectorLabels" (dict "ctx" .ctx "component" .component) | nindent 14 }}
{{- end }}
{{- end }}

{{/* A PodDisruptionBudget; call with (dict "ctx" $ "values" .Values.X "component" C "name" N). */}}
{{- define "damselfly.pdb" -}}
{{- with .values.podDisruptionBudget }}
{{- if .enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ $.name }}
  namespace: {{ $.ctx.Release.Namespace }}
  labels:
    {{- include "damselfly.labels" (dict "ctx" $.ctx "component" $.component) | nindent 4 }}
spec:
  maxUnavailable: {{ .maxUnavailable }}
  selector:
    matchLabels:
      {{- include "damselfly.selectorLabels" (dict "ctx" $.ctx "component" $.component) | nindent 6 }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Refuse a component config that sets a listen address: ports come from .Values.ports, and a
*_listen here would leave containerPorts, probes, Services and hosts.toml on the old numbers.
Call with (dict "config" .Values.X.config "where" "dfdaemon.config").
*/}}
{{- define "damselfly.checkNoListen" -}}
{{- range $key, $_ := (.config | default dict) }}
{{- if or (eq $key "listen") (hasSuffix "_listen" $key) }}
{{- fail (printf "%s.%s: set the port in ports.* instead (containerPorts, probes, Services and hosts.toml follow ports.*, not the config)" $.where $key) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "damselfly.selectorLabels" -}}
app.kubernetes.io/name: {{ include "damselfly.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "damselfly.scheduler.fullname" -}}{{ include "damselfly.fullname" . }}-scheduler{{- end }}
{{- define "damselfly.scheduler.headless" -}}{{ include "damselfly.fullname" . }}-scheduler-headless{{- end }}
{{- define "damselfly.seedPeer.fullname" -}}{{ include "damselfly.fullname" . }}-seed-peer{{- end }}
{{- define "damselfly.seedPeer.headless" -}}{{ include "damselfly.fullname" . }}-seed-peer-headless{{- end }}
{{- define "damselfly.dfdaemon.fullname" -}}{{ include "damselfly.fullname" . }}-dfdaemon{{- end }}

{{/* The scheduler pod addresses HOST:PORT, one per replica, as a YAML list. */}}
{{- define "damselfly.scheduler.addresses" -}}
{{- $ports := include "damselfly.ports" . | fromYaml }}
{{- $addresses := list }}
{{- if .Values.scheduler.enabled }}
{{- range $i := until (int .Values.scheduler.replicas) }}
{{- $addresses = append $addresses (printf "%s-%d.%s.%s.svc.%s:%v" (include "damselfly.scheduler.fullname" $) $i (include "damselfly.scheduler.headless" $) $.Release.Namespace $.Values.clusterDomain $ports.schedulerGrpc) }}
{{- end }}
{{- end }}
{{- toYaml $addresses }}
{{- end }}

{{/*
The schedulers a dfdaemon or seed uses, as a YAML list: config.scheduler when set (external
schedulers), else the chart's. Fails when there is none: every dfdaemon would exit at start.
*/}}
{{- define "damselfly.dfdaemon.schedulers" -}}
{{- $user := (.Values.dfdaemon.config | default dict).scheduler }}
{{- $addresses := include "damselfly.scheduler.addresses" . | fromYamlArray }}
{{- if $user }}
{{- $addresses = kindIs "string" $user | ternary (list $user) $user }}
{{- end }}
{{- if not $addresses }}
{{- fail "scheduler.enabled is false and dfdaemon.config.scheduler is empty: dfdaemons and seeds need schedulers; set dfdaemon.config.scheduler to your schedulers' HOST:PORT list" }}
{{- end }}
{{- toYaml $addresses }}
{{- end }}

{{/* The seed peer pod addresses HOST:PORT (dfdaemon gRPC), one per replica, as a YAML list. */}}
{{- define "damselfly.seedPeer.addresses" -}}
{{- $ports := include "damselfly.ports" . | fromYaml }}
{{- $addresses := list }}
{{- if .Values.seedPeer.enabled }}
{{- range $i := until (int .Values.seedPeer.replicas) }}
{{- $addresses = append $addresses (printf "%s-%d.%s.%s.svc.%s:%v" (include "damselfly.seedPeer.fullname" $) $i (include "damselfly.seedPeer.headless" $) $.Release.Namespace $.Values.clusterDomain $ports.dfdaemonGrpc) }}
{{- end }}
{{- end }}
{{- toYaml $addresses }}
{{- end }}

{{/*
Overlay a user config mapping on chart defaults, key by key (the configs are flat), so that any
user value wins, including false, 0 and "". Call with (dict "defaults" $d "user" $u).
*/}}
{{- define "damselfly.mergeConfig" -}}
{{- $config := deepCopy .defaults }}
{{- range $key, $value := (.user | default dict) }}
{{- $_ := set $config $key $value }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/*
Where Secrets are mounted (read-only). Separate from /etc/damselfly, the ConfigMap mount.
*/}}
{{- define "damselfly.secretPaths" -}}
tls: /var/run/secrets/damselfly/tls
proxyCA: /var/run/secrets/damselfly/proxy-ca
upstreamCA: /var/run/secrets/damselfly/upstream-ca
{{- end }}

{{/*
The role each TLS component proves with its certificate's CN (<role>.damselfly, common/identity.py).
*/}}
{{- define "damselfly.tls.roles" -}}
scheduler: scheduler
seedPeer: seed
dfdaemon: peer
admin: admin
{{- end }}

{{/*
Where the certificates come from: "secrets" (tls.existingSecret / tls.componentSecrets, made by
the user), "certManager" (tls.certManager.enabled) or "generated" (Helm genCA, the default).
*/}}
{{- define "damselfly.tls.source" -}}
{{- $tls := .Values.tls }}
{{- $named := false }}
{{- range $_, $name := ($tls.componentSecrets | default dict) }}{{ if $name }}{{ $named = true }}{{ end }}{{ end }}
{{- if or $tls.existingSecret $named }}secrets{{ else if $tls.certManager.enabled }}certManager{{ else }}generated{{ end }}
{{- end }}

{{/* Name of the Secret the chart makes (generated or cert-manager) for a component. */}}
{{- define "damselfly.tls.chartSecretName" -}}
{{- $suffix := dict "scheduler" "scheduler" "seedPeer" "seed-peer" "dfdaemon" "dfdaemon" "admin" "admin" }}
{{- printf "%s-%s-tls" (include "damselfly.fullname" .ctx) (get $suffix .component) }}
{{- end }}

{{/* Name of the Secret holding the chart's CA (tls.crt, tls.key): generated or cert-manager. */}}
{{- define "damselfly.tls.caSecretName" -}}{{ include "damselfly.fullname" . }}-tls-ca{{- end }}

{{/* The TLS Secret of a component; call with (dict "ctx" $ "component" "scheduler"|"seedPeer"|"dfdaemon"|"admin"). */}}
{{- define "damselfly.tls.secretName" -}}
{{- $tls := .ctx.Values.tls }}
{{- if eq (include "damselfly.tls.source" .ctx) "secrets" }}
{{- $name := get ($tls.componentSecrets | default dict) .component | default $tls.existingSecret }}
{{- if not $name }}
{{- fail (printf "tls.componentSecrets names some components' Secrets but not %s: set tls.componentSecrets.%s or tls.existingSecret (a Secret with ca.crt, tls.crt and tls.key), or clear them all to let the chart generate the certificates" .component .component) }}
{{- end }}
{{- $name }}
{{- else }}
{{- include "damselfly.tls.chartSecretName" . }}
{{- end }}
{{- end }}

{{/*
The DNS name every server certificate is checked for (tls_server_name): tls.serverName, or for
the chart's own certificates a name only they carry.
*/}}
{{- define "damselfly.tls.serverName" -}}
{{- if .Values.tls.serverName }}
{{- .Values.tls.serverName }}
{{- else if ne (include "damselfly.tls.source" .) "secrets" }}
{{- printf "%s.%s.damselfly.internal" (include "damselfly.fullname" .) .Release.Namespace }}
{{- end }}
{{- end }}

{{/* tls_* config keys of every component (empty when TLS is off). */}}
{{- define "damselfly.tls.config" -}}
{{- if .Values.tls.enabled }}
{{- $paths := include "damselfly.secretPaths" . | fromYaml }}
tls_ca_cert: {{ $paths.tls }}/ca.crt
tls_cert: {{ $paths.tls }}/tls.crt
tls_key: {{ $paths.tls }}/tls.key
tls_client_auth: {{ .Values.tls.clientAuth }}
{{- with include "damselfly.tls.serverName" . }}
tls_server_name: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Secret volumes and their mounts of a component, as YAML {volumes: [...], mounts: [...]};
call with (dict "ctx" $ "component" "scheduler"|"seedPeer"|"dfdaemon"|"admin" (the preheat Job)).
*/}}
{{- define "damselfly.secretVolumes" -}}
{{- $values := .ctx.Values }}
{{- $paths := include "damselfly.secretPaths" .ctx | fromYaml }}
{{- $secrets := list }}
{{- if $values.tls.enabled }}
{{- $secrets = append $secrets (dict "name" "tls" "secret" (include "damselfly.tls.secretName" .) "path" $paths.tls) }}
{{- end }}
{{- if has .component (list "seedPeer" "dfdaemon") }}
{{- $proxy := $values.dfdaemon.proxy }}
{{- if and (eq .component "dfdaemon") $proxy.caSecret }}
{{- $secrets = append $secrets (dict "name" "proxy-ca" "secret" $proxy.caSecret "path" $paths.proxyCA) }}
{{- end }}
{{- if $proxy.upstreamCASecret }}
{{- $secrets = append $secrets (dict "name" "upstream-ca" "secret" $proxy.upstreamCASecret "path" $paths.upstreamCA) }}
{{- end }}
{{- end }}
volumes:
{{- range $secrets }}
  - name: {{ .name }}
    secret:
      secretName: {{ .secret }}
      defaultMode: 0400
{{- end }}
mounts:
{{- range $secrets }}
  - name: {{ .name }}
    mountPath: {{ .path }}
    readOnly: true
{{- end }}
{{- end }}

{{/*
Listen addresses as flags, since a config file cannot read the downward API: call with
(dict "ctx" $ "component" "scheduler"|"seedPeer"|"dfdaemon"). Nothing binds 0.0.0.0 on a node's
network: peer-facing ports (gRPC, pieces, metrics) take the node IP ($(HOST_IP)), the proxy takes
127.0.0.1, where containerd and nydusd on the node reach it (hosts.toml), and only health stays on
every address (kubelet probes the node IP, nydusd pings 127.0.0.1). In a pod's own network
namespace peer-facing ports take the pod IP; metrics and health keep 0.0.0.0 there (nothing else
shares the namespace, and `kubectl port-forward` dials the pod's loopback). A seed's proxy serves
no one: loopback. Later flags win, so dfdaemon.extraArgs can override any of these.
*/}}
{{- define "damselfly.listenArgs" -}}
{{- $ports := include "damselfly.ports" .ctx | fromYaml }}
{{- $listen := dict }}
{{- if eq .component "scheduler" }}
{{- $listen = dict "--listen" (printf "$(POD_IP):%v" $ports.schedulerGrpc) "--metrics-listen" (printf "0.0.0.0:%v" $ports.schedulerMetrics) }}
{{- else }}
{{- $hostNetwork := and (eq .component "dfdaemon") .ctx.Values.dfdaemon.hostNetwork }}
{{- $proxyHost := "127.0.0.1" }}
{{- if and (eq .component "dfdaemon") (not $hostNetwork) }}{{ $proxyHost = "$(HOST_IP)" }}{{ end }}
{{- $listen = dict
  "--grpc-listen" (printf "$(HOST_IP):%v" $ports.dfdaemonGrpc)
  "--upload-listen" (printf "$(HOST_IP):%v" $ports.dfdaemonUpload)
  "--proxy-listen" (printf "%s:%v" $proxyHost $ports.dfdaemonProxy)
  "--metrics-listen" (printf "%s:%v" (ternary "$(HOST_IP)" "0.0.0.0" $hostNetwork) $ports.dfdaemonMetrics)
  "--health-listen" (printf "0.0.0.0:%v" $ports.dfdaemonHealth)
}}
{{- end }}
{{- $args := list }}
{{- range $flag := keys $listen | sortAlpha }}{{ $args = concat $args (list $flag (get $listen $flag)) }}{{ end }}
{{- toYaml $args }}
{{- end }}

{{/* scheduler.yaml */}}
{{- define "damselfly.scheduler.config" -}}
{{- include "damselfly.checkNoListen" (dict "config" .Values.scheduler.config "where" "scheduler.config") }}
{{- $defaults := dict
  "log_level" .Values.log.level
  "log_format" .Values.log.format
  "seed_peer" (include "damselfly.seedPeer.addresses" . | fromYamlArray)
}}
{{- $defaults = merge $defaults (include "damselfly.tls.config" . | fromYaml) }}
{{- include "damselfly.mergeConfig" (dict "defaults" $defaults "user" .Values.scheduler.config) }}
{{- end }}

{{/* Keys shared by dfdaemon.yaml and dfdaemon-seed.yaml. */}}
{{- define "damselfly.dfdaemon.baseConfig" -}}
log_level: {{ .Values.log.level }}
log_format: {{ .Values.log.format }}
scheduler:
{{- include "damselfly.dfdaemon.schedulers" . | nindent 2 }}
data_dir: /var/lib/damselfly
socket: /var/run/damselfly/dfdaemon.sock
{{- with include "damselfly.tls.config" . }}
{{ . }}
{{- end }}
{{- if .Values.dfdaemon.proxy.upstreamCASecret }}
proxy_upstream_ca_cert: {{ (include "damselfly.secretPaths" . | fromYaml).upstreamCA }}/ca.crt
{{- end }}
{{- with include "damselfly.allowedUpstreams" . | fromYamlArray }}
proxy_allowed_upstreams:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The upstreams the proxy may reach for its clients (proxy_allowed_upstreams), as a YAML list: the
server of every registry in containerd.injectMirror.registries (scheme://host[:port]) and
dfdaemon.proxy.allowedUpstreams. Nothing else: not the registry a client names.
*/}}
{{- define "damselfly.allowedUpstreams" -}}
{{- $upstreams := list }}
{{- range .Values.containerd.injectMirror.registries }}
{{- $upstreams = append $upstreams (regexFind "^https?://[^/?#]+" .server) }}
{{- end }}
{{- toYaml (concat $upstreams .Values.dfdaemon.proxy.allowedUpstreams | uniq) }}
{{- end }}

{{/* dfdaemon.yaml */}}
{{- define "damselfly.dfdaemon.config" -}}
{{- include "damselfly.checkNoListen" (dict "config" .Values.dfdaemon.config "where" "dfdaemon.config") }}
{{- $defaults := include "damselfly.dfdaemon.baseConfig" . | fromYaml }}
{{- $_ := set $defaults "cache_quota" (include "damselfly.bytes" .Values.dfdaemon.cacheQuota | int64) }}
{{- $proxy := .Values.dfdaemon.proxy }}
{{- if $proxy.interceptHosts }}
{{- if not $proxy.caSecret }}
{{- fail "dfdaemon.proxy.interceptHosts needs dfdaemon.proxy.caSecret: a Secret with the CA (tls.crt, tls.key) that signs the intercepted hosts' certificates" }}
{{- end }}
{{- $_ := set $defaults "proxy_intercept_hosts" $proxy.interceptHosts }}
{{- end }}
{{- if $proxy.caSecret }}
{{- $dir := (include "damselfly.secretPaths" . | fromYaml).proxyCA }}
{{- $_ := set $defaults "proxy_ca_cert" (printf "%s/tls.crt" $dir) }}
{{- $_ := set $defaults "proxy_ca_key" (printf "%s/tls.key" $dir) }}
{{- end }}
{{- if $proxy.p2pConcurrency }}
{{- $_ := set $defaults "proxy_p2p_concurrency" $proxy.p2pConcurrency }}
{{- end }}
{{- if $proxy.p2pRate }}
{{- $_ := set $defaults "proxy_p2p_rate" $proxy.p2pRate }}
{{- end }}
{{- include "damselfly.mergeConfig" (dict "defaults" $defaults "user" .Values.dfdaemon.config) }}
{{- end }}

{{/* dfdaemon-seed.yaml */}}
{{- define "damselfly.seedPeer.config" -}}
{{- include "damselfly.checkNoListen" (dict "config" .Values.seedPeer.config "where" "seedPeer.config") }}
{{- $defaults := include "damselfly.dfdaemon.baseConfig" . | fromYaml }}
{{- $_ := set $defaults "seed" true }}
{{- /* A volume's root is group-writable (fsGroup) or 0777 (emptyDir), which the daemon refuses for
its cache: the cache is a 0700 directory it makes inside. */ -}}
{{- $_ := set $defaults "data_dir" "/var/lib/damselfly/cache" }}
{{- $volume := include "damselfly.bytes" .Values.seedPeer.persistence.size | int64 }}
{{- $_ := set $defaults "cache_quota" (div (mul $volume (int64 .Values.seedPeer.cacheQuotaPercent)) 100) }}
{{- include "damselfly.mergeConfig" (dict "defaults" $defaults "user" .Values.seedPeer.config) }}
{{- end }}

{{/*
hosts.toml of one registry; call with (dict "ctx" $ "registry" $registry). The first line is the
marker the init container and the restore hook use to tell the chart's files from the node's.
*/}}
{{- define "damselfly.containerd.marker" -}}# Written by the Damselfly chart{{- end }}
{{- define "damselfly.containerd.hostsToml" -}}
{{- $ports := include "damselfly.ports" .ctx | fromYaml -}}
{{- $mirror := printf "http://127.0.0.1:%v" $ports.mirrorPort -}}
{{ include "damselfly.containerd.marker" .ctx }} ({{ .ctx.Release.Name }}): pull {{ .registry.host }} through the
# local dfdaemon, and go straight to the registry when the dfdaemon is unavailable.
server = {{ .registry.server | quote }}

[host.{{ $mirror | quote }}]
  capabilities = ["pull", "resolve"]
  dial_timeout = {{ .ctx.Values.containerd.injectMirror.dialTimeout | quote }}
  # The upstream the dfdaemon fetches from: containerd's ?ns= names only the host.
  [host.{{ $mirror | quote }}.header]
    X-Dragonfly-Registry = [{{ .registry.server | quote }}]
{{- range .ctx.Values.containerd.injectMirror.extraMirrors }}

# Tried when the local dfdaemon does not answer, before the registry (e.g. Dragonfly's dfdaemon
# during a migration, docs/chart.md).
[host.{{ . | quote }}]
  capabilities = ["pull", "resolve"]
  dial_timeout = {{ $.ctx.Values.containerd.injectMirror.dialTimeout | quote }}
  [host.{{ . | quote }}.header]
    X-Dragonfly-Registry = [{{ $.registry.server | quote }}]
{{- end }}
{{- end }}

{{/* Env vars telling a dfdaemon who it is (used in its args). */}}
{{- define "damselfly.dfdaemon.identityEnv" -}}
- name: HOST_IP
  valueFrom:
    fieldRef:
      fieldPath: {{ .hostIPField }}
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end }}

{{/* Liveness / readiness / startup probes of a component; call with (dict "port" N). */}}
{{- define "damselfly.probes" -}}
startupProbe:
  httpGet:
    path: /healthy
    port: {{ .port }}
  periodSeconds: 2
  failureThreshold: 60
livenessProbe:
  httpGet:
    path: /healthy
    port: {{ .port }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /ready
    port: {{ .port }}
  periodSeconds: 5
  timeoutSeconds: 5
  failureThreshold: 3
{{- end }}
